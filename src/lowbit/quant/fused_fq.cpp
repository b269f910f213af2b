// Fused LSQ fake quantization for CPU float32 as one C++ autograd node: one pass forward, one pass
// backward, nothing saved between them but the input, and no Python in either pass (a Python autograd
// Function cost 60-120 us per quantizer and step, more than the arithmetic of a small weight).
// Rows run in parallel on torch's intra-op threads.
//
// x is viewed as (outer, C, inner), contiguous; scale and zero point have C entries (C = 1 per tensor).
// With s_c = max(|scale_c|, eps), per element:
//   r = x * (1/s_c);   t = rint(r) + z_c   (rint: half to even in the default rounding mode)
//   q = clamp(t, qmin, qmax);   inside = (t == q);
//   y = (q - z_c) * s_c
// which is exactly what torch.fake_quantize_per_{tensor,channel}_affine and lowbit's composed path
// compute (built with -ffp-contract=off and no fast-math, so the compiler may not fuse or reorder it).
// The backward recomputes t and q from x (cheaper than storing a mask and reading y back) and gives
//   dx = g * inside                   (a multiply, like torch's g * mask: nan/inf propagate alike)
//   d s_c = sum(g * (q - z)) - sum(dx * r)      (LSQ; r = x/s)        d scale = sign(scale) * d s
//   d z_c = -s_c * sum(g - dx)                  (LSQ+: clipped elements only)
// Sums run in float over blocks (an explicit SIMD reduction, fused multiply-adds where the CPU has
// them: a fixed order for a given build) and in double across blocks and rows; rows are reduced in a
// fixed order, so threads do not change results.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr float kEps = 1e-8f;
constexpr int64_t kBlock = 4096;

void check(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.is_contiguous(),
              name, " must be a contiguous float32 CPU tensor");
}

inline float positive(float v) {
  const float a = std::fabs(v);
  return a < kEps ? kEps : a;
}

inline float madd(float a, float b, float acc) {  // only in the sums: the forward's values stay exact
#ifdef __FMA__
  return std::fma(a, b, acc);
#else
  return acc + a * b;
#endif
}

// Rows [0, rows) in contiguous ranges on torch's intra-op threads (at::parallel_for, OpenMP). Each
// row's work and partial sums are the same whichever thread runs it, so results do not depend on the
// thread count. Small tensors stay on one thread. The lambdas capture the grid by value and index
// through __restrict__ row pointers: captured references would alias the stores and stop the
// vectoriser (that was a 30x slowdown).
template <typename F>
void for_rows(int64_t rows, int64_t inner, const F& fn) {
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(inner, 1));
  at::parallel_for(0, rows, grain, fn);
}

struct Layout {
  int64_t outer, channels, inner;
  float lo, hi;
};

torch::Tensor forward_impl(const torch::Tensor& x, const torch::Tensor& scale, const torch::Tensor& zero_point,
                           const Layout& L) {
  const bool has_z = zero_point.numel() > 0;
  auto y = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* sp = scale.data_ptr<float>();
  const float* zp = has_z ? zero_point.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const int64_t channels = L.channels, inner = L.inner;
  const float lo = L.lo, hi = L.hi;
  for_rows(L.outer * channels, inner, [=](int64_t r0, int64_t r1) {  // by value: no aliasing with y
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t c = r % channels;
      const float s = positive(sp[c]);
      const float inv = 1.0f / s;
      const float z = has_z ? zp[c] : 0.0f;
      const float* __restrict__ xr = xp + r * inner;
      float* __restrict__ yr = yp + r * inner;
      for (int64_t i = 0; i < inner; ++i) {
        const float t = __builtin_rintf(xr[i] * inv) + z;
        const float q = t < lo ? lo : (t > hi ? hi : t);  // min/max that vectorise
        yr[i] = (q - z) * s;
      }
    }
  });
  return y;
}

// One row's dx and partial sums; kZ: a zero point, kSums: the scale / zero-point sums are wanted.
template <bool kZ, bool kSums>
inline void backward_row(const float* __restrict__ gr, const float* __restrict__ xr, float* __restrict__ dr,
                         int64_t inner, float inv, float z, float lo, float hi, double* out) {
  double a = 0.0, b = 0.0, k = 0.0;
  for (int64_t i0 = 0; i0 < inner; i0 += kBlock) {
    const int64_t i1 = std::min<int64_t>(inner, i0 + kBlock);
    float fa = 0.0f, fb = 0.0f, fk = 0.0f;
#pragma omp simd reduction(+ : fa, fb, fk)
    for (int64_t i = i0; i < i1; ++i) {
      const float gi = gr[i];
      const float ri = xr[i] * inv;
      const float t = kZ ? __builtin_rintf(ri) + z : __builtin_rintf(ri);
      const float q = t < lo ? lo : (t > hi ? hi : t);
      const float d = gi * static_cast<float>(t == q);  // a multiply, like torch's g * mask
      dr[i] = d;
      if (kSums) {
        fa = madd(gi, kZ ? q - z : q, fa);
        fb = madd(d, ri, fb);
        if (kZ) fk += gi - d;
      }
    }
    a += fa;
    b += fb;
    k += fk;
  }
  out[0] = a;
  out[1] = b;
  out[2] = k;
}

template <bool kZ, bool kSums>
void backward_rows(const float* gp, const float* xp, float* dp, const float* sp, const float* zp, const Layout& L,
                   std::vector<double>& acc) {
  const int64_t channels = L.channels, inner = L.inner;
  const float lo = L.lo, hi = L.hi;
  double* accp = acc.data();
  for_rows(L.outer * channels, inner, [=](int64_t r0, int64_t r1) {
    double sink[3];
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t c = r % channels;
      const float inv = 1.0f / positive(sp[c]);
      const int64_t off = r * inner;
      backward_row<kZ, kSums>(gp + off, xp + off, dp + off, inner, inv, kZ ? zp[c] : 0.0f, lo, hi,
                              kSums ? accp + 3 * r : sink);
    }
  });
}

// {dx, d_scale (C,) or undefined, d_zero_point (C,) or undefined}
std::vector<torch::Tensor> backward_impl(const torch::Tensor& g_in, const torch::Tensor& x,
                                         const torch::Tensor& scale, const torch::Tensor& zero_point,
                                         const Layout& L, bool need_scale, bool need_zero_point) {
  auto g = g_in.to(torch::kFloat32).contiguous();
  check(g, "grad");
  TORCH_CHECK(g.sizes() == x.sizes(), "grad does not match the input's shape");
  const bool has_z = zero_point.numel() > 0;
  need_zero_point = need_zero_point && has_z;
  const bool sums = need_scale || need_zero_point;
  const int64_t rows = L.outer * L.channels;
  auto dx = torch::empty_like(x);
  std::vector<double> acc(sums ? 3 * rows : 0);
  const float* gp = g.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const float* sp = scale.data_ptr<float>();
  const float* zp = has_z ? zero_point.data_ptr<float>() : nullptr;
  float* dp = dx.data_ptr<float>();
  if (has_z) {
    sums ? backward_rows<true, true>(gp, xp, dp, sp, zp, L, acc) : backward_rows<true, false>(gp, xp, dp, sp, zp, L, acc);
  } else {
    sums ? backward_rows<false, true>(gp, xp, dp, sp, zp, L, acc) : backward_rows<false, false>(gp, xp, dp, sp, zp, L, acc);
  }
  torch::Tensor d_scale, d_zero;
  if (sums) {
    const int64_t channels = L.channels;
    std::vector<double> sq(channels, 0.0), sx(channels, 0.0), sk(channels, 0.0);
    for (int64_t r = 0; r < rows; ++r) {  // fixed order: deterministic for any thread count
      const int64_t c = r % channels;
      sq[c] += acc[3 * r];
      sx[c] += acc[3 * r + 1];
      sk[c] += acc[3 * r + 2];
    }
    if (need_scale) {
      d_scale = torch::empty({channels}, x.options());
      float* ds = d_scale.data_ptr<float>();
      for (int64_t c = 0; c < channels; ++c) {
        const double d_s = sq[c] - sx[c];
        ds[c] = static_cast<float>(sp[c] < 0.0f ? -d_s : d_s);
      }
    }
    if (need_zero_point) {
      d_zero = torch::empty({channels}, x.options());
      float* dz = d_zero.data_ptr<float>();
      for (int64_t c = 0; c < channels; ++c) dz[c] = static_cast<float>(-static_cast<double>(positive(sp[c])) * sk[c]);
    }
  }
  return {dx, d_scale, d_zero};
}

Layout layout_of(const torch::Tensor& x, const torch::Tensor& scale, const torch::Tensor& zero_point,
                 int64_t outer, int64_t channels, int64_t inner, double qmin, double qmax) {
  check(x, "x");
  check(scale, "scale");
  if (zero_point.numel() > 0) {
    check(zero_point, "zero_point");
    TORCH_CHECK(zero_point.numel() == channels, "zero_point does not match the scale");
  }
  TORCH_CHECK(outer >= 0 && channels > 0 && inner >= 0 && outer * channels * inner == x.numel() &&
                  scale.numel() == channels, "layout does not match");
  return Layout{outer, channels, inner, static_cast<float>(qmin), static_cast<float>(qmax)};
}

// The autograd node: scale and zero point arrive in their own shapes and get gradients in them.
struct FakeQuantize : public torch::autograd::Function<FakeQuantize> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                               const torch::Tensor& scale, const torch::Tensor& zero_point, int64_t outer,
                               int64_t channels, int64_t inner, double qmin, double qmax) {
    auto s = scale.reshape({-1}).contiguous();
    auto z = zero_point.reshape({-1}).contiguous();
    const Layout L = layout_of(x, s, z, outer, channels, inner, qmin, qmax);
    ctx->save_for_backward({x, scale, zero_point});
    ctx->saved_data["layout"] = std::vector<int64_t>{outer, channels, inner};
    ctx->saved_data["qmin"] = qmin;
    ctx->saved_data["qmax"] = qmax;
    return forward_impl(x, s, z, L);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    TORCH_CHECK(!torch::GradMode::is_enabled(),
                "the fused fake-quant kernel has no second derivative: compute it inside "
                "lowbit.quant.kernels.torch_ops()");
    auto saved = ctx->get_saved_variables();
    const auto& x = saved[0];
    const auto& scale = saved[1];
    const auto& zero_point = saved[2];
    const auto dims = ctx->saved_data["layout"].toIntVector();
    const Layout L{dims[0], dims[1], dims[2], static_cast<float>(ctx->saved_data["qmin"].toDouble()),
                   static_cast<float>(ctx->saved_data["qmax"].toDouble())};
    const bool need_s = ctx->needs_input_grad(1);
    const bool need_z = zero_point.numel() > 0 && ctx->needs_input_grad(2);
    auto out = backward_impl(grads[0], x, scale.reshape({-1}).contiguous(), zero_point.reshape({-1}).contiguous(), L,
                             need_s, need_z);
    torch::Tensor d_scale = need_s ? out[1].reshape(scale.sizes()) : torch::Tensor();
    torch::Tensor d_zero = need_z ? out[2].reshape(zero_point.sizes()) : torch::Tensor();
    return {out[0], d_scale, d_zero, torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor(),
            torch::Tensor()};
  }
};

}  // namespace

torch::Tensor fake_quantize(const torch::Tensor& x, const torch::Tensor& scale, const torch::Tensor& zero_point,
                            int64_t outer, int64_t channels, int64_t inner, double qmin, double qmax) {
  return FakeQuantize::apply(x, scale, zero_point, outer, channels, inner, qmin, qmax);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fake_quantize", &fake_quantize,
        "fused fake quantization with LSQ gradients (x, scale, zero_point or an empty tensor, outer, channels, "
        "inner, qmin, qmax)");
}
