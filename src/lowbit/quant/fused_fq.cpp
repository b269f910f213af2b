// Fused LSQ fake quantization for CPU float32: one pass forward, one pass backward, nothing saved
// between them but the input; rows run in parallel on torch's intra-op threads.
//
// x is viewed as (outer, C, inner), contiguous; scale and zero point have C entries (C = 1 per tensor).
// With s_c = max(|scale_c|, eps), per element:
//   t = rint(x * (1/s_c)) + z_c   (rint: half to even in the default rounding mode)
//   q = clamp(t, qmin, qmax);   inside = (t == q);
//   y = (q - z_c) * s_c
// which is exactly what torch.fake_quantize_per_{tensor,channel}_affine and lowbit's composed path
// compute (built with -ffp-contract=off and no fast-math, so the compiler may not fuse or reorder it).
// The backward recomputes t and q from x (cheaper than storing a mask and reading y back) and gives
//   dx = g * inside            (a multiply, like torch's g * mask: nan/inf propagate alike)
//   d s_c = sum(g * (q - z)) - sum(dx * x) / s_c      (LSQ)          d scale = sign(scale) * d s
//   d z_c = -s_c * sum(g - dx)                         (LSQ+: clipped elements only)
// Sums run in float over blocks (an explicit SIMD reduction: a fixed order for a given build) and in
// double across blocks and rows; rows are reduced in a fixed order, so threads do not change results.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr float kEps = 1e-8f;

void check(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.is_contiguous(),
              name, " must be a contiguous float32 CPU tensor");
}

inline float positive(float v) {
  const float a = std::fabs(v);
  return a < kEps ? kEps : a;
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

}  // namespace

torch::Tensor fq_forward(torch::Tensor x, torch::Tensor scale, torch::Tensor zero_point, int64_t outer,
                         int64_t channels, int64_t inner, double qmin, double qmax) {
  check(x, "x");
  check(scale, "scale");
  TORCH_CHECK(outer * channels * inner == x.numel() && scale.numel() == channels, "layout does not match");
  const bool has_z = zero_point.numel() > 0;
  if (has_z) check(zero_point, "zero_point");
  auto y = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* sp = scale.data_ptr<float>();
  const float* zp = has_z ? zero_point.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const float lo = static_cast<float>(qmin), hi = static_cast<float>(qmax);
  for_rows(outer * channels, inner, [&, lo, hi](int64_t r0, int64_t r1) {  // by value: no aliasing with y
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

// Returns {dx, d_scale (C,), d_zero_point (C,) or empty}.
std::vector<torch::Tensor> fq_backward(torch::Tensor g, torch::Tensor x, torch::Tensor scale,
                                       torch::Tensor zero_point, int64_t outer, int64_t channels,
                                       int64_t inner, double qmin, double qmax, bool need_scale,
                                       bool need_zero_point) {
  g = g.contiguous();
  check(g, "grad");
  check(x, "x");
  check(scale, "scale");
  const bool has_z = zero_point.numel() > 0;
  if (has_z) check(zero_point, "zero_point");
  auto dx = torch::empty_like(x);
  const int64_t rows = outer * channels;
  const bool sums = need_scale || need_zero_point;
  std::vector<double> acc_q(sums ? rows : 0), acc_x(sums ? rows : 0), acc_clip(sums ? rows : 0);
  const float* __restrict__ gp = g.data_ptr<float>();
  const float* __restrict__ xp = x.data_ptr<float>();
  const float* sp = scale.data_ptr<float>();
  const float* zp = has_z ? zero_point.data_ptr<float>() : nullptr;
  float* __restrict__ dp = dx.data_ptr<float>();
  const float lo = static_cast<float>(qmin), hi = static_cast<float>(qmax);
  for_rows(rows, inner, [&, lo, hi](int64_t r0, int64_t r1) {
    constexpr int64_t kBlock = 4096;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t c = r % channels;
      const float s = positive(sp[c]);
      const float inv = 1.0f / s;
      const float z = has_z ? zp[c] : 0.0f;
      const int64_t off = r * inner;
      const float* __restrict__ gr = gp + off;
      const float* __restrict__ xr = xp + off;
      float* __restrict__ dr = dp + off;
      double a = 0.0, b = 0.0, k = 0.0;
      for (int64_t i0 = 0; i0 < inner; i0 += kBlock) {
        const int64_t i1 = std::min<int64_t>(inner, i0 + kBlock);
        float fa = 0.0f, fb = 0.0f, fk = 0.0f;
#pragma omp simd reduction(+ : fa, fb, fk)
        for (int64_t i = i0; i < i1; ++i) {
          const float xi = xr[i];
          const float gi = gr[i];
          const float t = __builtin_rintf(xi * inv) + z;
          const float q = t < lo ? lo : (t > hi ? hi : t);
          const float d = gi * static_cast<float>(t == q);  // branch-free
          dr[i] = d;
          fa += gi * (q - z);
          fb += d * xi;
          fk += gi - d;
        }
        a += fa;
        b += fb;
        k += fk;
      }
      if (sums) {
        acc_q[r] = a;
        acc_x[r] = b;
        acc_clip[r] = k;
      }
    }
  });
  torch::Tensor d_scale, d_zero;
  if (sums) {
    std::vector<double> sq(channels, 0.0), sx(channels, 0.0), sk(channels, 0.0);
    for (int64_t r = 0; r < rows; ++r) {  // fixed order: deterministic for any thread count
      const int64_t c = r % channels;
      sq[c] += acc_q[r];
      sx[c] += acc_x[r];
      sk[c] += acc_clip[r];
    }
    d_scale = torch::empty({channels}, x.options());
    d_zero = torch::empty({has_z ? channels : 0}, x.options());
    float* ds = d_scale.data_ptr<float>();
    float* dz = d_zero.data_ptr<float>();
    for (int64_t c = 0; c < channels; ++c) {
      const double s = positive(sp[c]);
      const double d_s = sq[c] - sx[c] / s;
      ds[c] = static_cast<float>(sp[c] < 0.0f ? -d_s : d_s);
      if (has_z) dz[c] = static_cast<float>(-s * sk[c]);
    }
  }
  return {dx, d_scale, d_zero};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fq_forward", &fq_forward, "fused fake-quant forward");
  m.def("fq_backward", &fq_backward, "fused fake-quant backward");
}
