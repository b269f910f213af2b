"""QBitOpt's bit-allocation solvers (Peters et al., 2023, arXiv 2307.04535), as pure numpy/scipy math.

Problem. L layers; layer l takes one bit width b_l from its candidates B_l (a sorted tuple shared by all
layers, or a single pinned width), with

    sensitivity   Omega_l(b) = c_l * (2^b - 1)^(-2)        c_l >= 0  (e.g. Tr(F_l) * range_l^2 / 24)
    cost          cost_l(b)  = w_l * b + f_l               w_l > 0 (e.g. weight count), f_l >= 0 fixed

    min_b  sum_l Omega_l(b_l)    s.t.  sum_l cost_l(b_l) <= budget,   b_l in B_l.

For an average-bit-width constraint sum_l w_l b_l <= target * sum_l w_l, the fixed costs are added to both
sides: budget = target * sum_l w_l + sum_l f_l (`average_bits_budget`), so f never changes which
allocations are feasible under that constraint; it only matters when the budget is a total (e.g. bytes).

Relaxation (`allocate_relaxed`). With b continuous in [min B_l, max B_l], (2^b - 1)^(-2) is convex and
decreasing, so the problem is convex. Its Lagrangian separates per layer:

    min_b  c_l (2^b - 1)^(-2) + lambda * w_l * b
    stationarity:  2 ln2 c_l 2^b / (2^b - 1)^3 = lambda w_l
    with x = 2^b = 1 + y:   y^3 - K y - K = 0,   K = 2 ln2 c_l / (lambda w_l)

which has exactly one positive root (solved in closed form, Cardano), clipped to [min B_l, max B_l].
The total cost is non-increasing in lambda, so lambda is found by bisection (in log lambda) keeping the
feasible side. Feasible rounding: every b_l is rounded down to the nearest candidate (cost only drops),
then layers are raised one candidate step at a time, always the step with the largest
[Omega_l(b) - Omega_l(b')] / [w_l (b' - b)] that still fits in the budget, until none fits; then a descent
over feasible one-step swaps (raise one layer, lower another) with a fill after each. The same fill and
descent run from the all-minimum allocation too, and the better result is kept (on coarse grids the floor
can strand a layer below a wide gap). Every step keeps the allocation feasible, so the result always meets
the budget. Fill and descent are a reconstruction (METHODS.md section 4.4), not the paper's text.

Exact (`allocate_exact`). One binary x_{l,k} per (layer, candidate):

    min sum_{l,k} c_l (2^B_k - 1)^(-2) x_{l,k}
    s.t. sum_k x_{l,k} = 1 (each l),   sum_{l,k} (w_l B_k + f_l) x_{l,k} <= budget,   x binary

solved by scipy.optimize.milp (HiGHS) with a zero relative MIP gap.

Feasibility is checked as  total <= budget + 1e-9 * max(1, |budget|)  so that float sums of the costs at
exactly the minimum budget count as feasible.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
from scipy import optimize, sparse

from lowbit.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_CANDIDATES: tuple[int, ...] = (2, 3, 4, 5, 6, 8)
_REL_TOL = 1e-9


def objective(c: Sequence[float] | np.ndarray, bits: Sequence[float] | np.ndarray) -> float:
    """Sum_l c_l * (2^b_l - 1)^(-2)."""
    c_arr, b_arr = np.asarray(c, dtype=float), np.asarray(bits, dtype=float)
    return float(np.sum(c_arr / (np.exp2(b_arr) - 1.0) ** 2))


def cost(w: Sequence[float] | np.ndarray, f: Sequence[float] | np.ndarray, bits: Sequence[float] | np.ndarray) -> float:
    """Sum_l (w_l * b_l + f_l)."""
    return float(np.sum(np.asarray(w, dtype=float) * np.asarray(bits, dtype=float) + np.asarray(f, dtype=float)))


def average_bits_budget(w: Sequence[float] | np.ndarray, f: Sequence[float] | np.ndarray, target_avg: float) -> float:
    """The budget for which cost <= budget means sum_l w_l b_l <= target_avg * sum_l w_l.

    The fixed costs f are added to both sides: budget = target_avg * sum(w) + sum(f).
    """
    if not (isinstance(target_avg, int | float) and math.isfinite(target_avg) and target_avg > 0):
        raise ConfigError(f"target_avg={target_avg!r}: must be a finite number > 0")
    w_arr = _vector("w", w)
    f_arr = _vector("f", f)
    _check_lengths(w=w_arr, f=f_arr)
    return float(target_avg * w_arr.sum() + f_arr.sum())


def minimum_budget(
    w: Sequence[float] | np.ndarray,
    f: Sequence[float] | np.ndarray,
    candidates: Sequence[int] = DEFAULT_CANDIDATES,
    pinned: Sequence[int | None] | None = None,
) -> float:
    """The cost with every layer at its smallest allowed width (pinned layers at their pinned width)."""
    w_arr = _vector("w", w)
    f_arr = _vector("f", f)
    _check_lengths(w=w_arr, f=f_arr)
    _check_w_f(w_arr, f_arr)
    table, _ = _candidate_table(candidates, pinned, len(w_arr))
    return cost(w_arr, f_arr, table[:, 0])


def allocate_relaxed(
    c: Sequence[float] | np.ndarray,
    w: Sequence[float] | np.ndarray,
    f: Sequence[float] | np.ndarray,
    budget: float,
    candidates: Sequence[int] = DEFAULT_CANDIDATES,
    pinned: Sequence[int | None] | None = None,
) -> np.ndarray:
    """Bits per layer from the convex relaxation, bisection on lambda, then feasible rounding (see module)."""
    c_arr, w_arr, f_arr, table, counts = _validate(c, w, f, budget, candidates, pinned)
    lo = table[:, 0]  # (L,)
    hi = table[np.arange(len(lo)), counts - 1]  # (L,)
    b_cont = _relaxed_bits(c_arr, w_arr, f_arr, budget, lo, hi)

    # Round down to the nearest candidate; the small slack keeps 3.9999999 at 4.
    idx = np.maximum((table <= b_cont[:, None] + 1e-9).sum(axis=1) - 1, 0)  # (L,)
    bits = table[np.arange(len(idx)), idx]
    if not _fits(cost(w_arr, f_arr, bits), budget):  # only possible through the 1e-9 slack
        idx = np.zeros_like(idx)
        bits = table[:, 0].copy()

    # The greedy fill from a floor can strand a layer below a wide candidate gap, so it is followed by a
    # descent over one-step swaps (raise i, lower j) that fit; every step keeps the allocation feasible.
    # The same fill and descent from the all-minimum allocation covers the cases the floor misleads.
    finals = []
    for start in (idx, np.zeros_like(idx)):
        start = _greedy_fill(c_arr, w_arr, f_arr, budget, table, counts, start)
        for _ in range(4 * table.size):
            swapped = _best_swap(c_arr, w_arr, f_arr, budget, table, counts, start)
            if swapped is None:
                break
            start = _greedy_fill(c_arr, w_arr, f_arr, budget, table, counts, swapped)
        finals.append(table[np.arange(len(start)), start])
    bits = min(finals, key=lambda b: objective(c_arr, b))

    total = cost(w_arr, f_arr, bits)
    assert _fits(total, budget), f"relaxed allocation costs {total} > budget {budget}"
    return bits.astype(int)


def fill(
    c: Sequence[float] | np.ndarray,
    w: Sequence[float] | np.ndarray,
    f: Sequence[float] | np.ndarray,
    budget: float,
    start: Sequence[int] | np.ndarray,
    candidates: Sequence[int] = DEFAULT_CANDIDATES,
) -> np.ndarray:
    """From the feasible allocation ``start`` (each entry a candidate), raise layers one candidate step at a
    time by the largest objective gain per cost that still fits, until none fits (the rounding's fill)."""
    c_arr, w_arr, f_arr, table, counts = _validate(c, w, f, budget, candidates, None)
    cands = list(table[0, : counts[0]])
    bits = np.asarray(start, dtype=float)
    if bits.shape != c_arr.shape or not all(b in cands for b in bits):
        raise ConfigError(f"start={np.asarray(start).tolist()}: needs one entry per layer, each one of {candidates}")
    if not _fits(cost(w_arr, f_arr, bits), budget):
        raise ConfigError(f"start={bits.astype(int).tolist()} costs {cost(w_arr, f_arr, bits)} > budget {budget}")
    idx = np.array([cands.index(b) for b in bits])
    idx = _greedy_fill(c_arr, w_arr, f_arr, budget, table, counts, idx)
    return table[np.arange(len(idx)), idx].astype(int)


def allocate_exact(
    c: Sequence[float] | np.ndarray,
    w: Sequence[float] | np.ndarray,
    f: Sequence[float] | np.ndarray,
    budget: float,
    candidates: Sequence[int] = DEFAULT_CANDIDATES,
    pinned: Sequence[int | None] | None = None,
    time_limit: float = 10.0,
) -> np.ndarray:
    """The integer optimum by scipy.optimize.milp (HiGHS); one binary per (layer, candidate).

    If HiGHS stops at `time_limit` with a feasible incumbent, that incumbent is returned and a warning
    logged; without one, RuntimeError.
    """
    c_arr, w_arr, f_arr, table, counts = _validate(c, w, f, budget, candidates, pinned)
    n_layers = len(c_arr)
    layer = np.repeat(np.arange(n_layers), counts)  # (V,) layer of each variable
    b_var = np.concatenate([table[l, : counts[l]] for l in range(n_layers)])  # (V,)
    n_var = len(b_var)

    obj = c_arr[layer] / (np.exp2(b_var) - 1.0) ** 2
    obj_scale = max(float(np.abs(obj).max()), 1e-300)
    row = w_arr[layer] * b_var + f_arr[layer]
    row_scale = max(float(np.abs(row).max()), abs(budget), 1e-300)

    onehot = sparse.csr_array((np.ones(n_var), (layer, np.arange(n_var))), shape=(n_layers, n_var))
    eq = optimize.LinearConstraint(onehot, 1.0, 1.0)
    rhs = budget
    for _ in range(3):  # re-solve with a tighter rhs if HiGHS's tolerance let the budget slip
        res = optimize.milp(
            obj / obj_scale,
            integrality=np.ones(n_var),
            bounds=optimize.Bounds(0.0, 1.0),
            constraints=[eq, optimize.LinearConstraint(row[None, :] / row_scale, -np.inf, rhs / row_scale)],
            options={"time_limit": time_limit, "mip_rel_gap": 0.0},
        )
        if res.x is None:
            raise RuntimeError(f"MILP found no allocation (status {res.status}: {res.message})")
        if res.status != 0:
            log.warning("MILP stopped early (%s); returning the best allocation found", res.message)
        chosen = np.zeros(n_layers, dtype=int)
        for l in range(n_layers):
            sel = layer == l
            chosen[l] = int(b_var[sel][np.argmax(res.x[sel])])
        total = cost(w_arr, f_arr, chosen)
        if _fits(total, budget):
            return chosen
        rhs -= (total - budget) + _REL_TOL * max(1.0, abs(budget))
    raise RuntimeError(f"MILP allocation costs {total} > budget {budget} after tightening")


# --- internals -------------------------------------------------------------------------------------


def _relaxed_bits(
    c: np.ndarray, w: np.ndarray, f: np.ndarray, budget: float, lo: np.ndarray, hi: np.ndarray
) -> np.ndarray:
    """The continuous optimum of the relaxation, on the feasible side of the lambda bisection."""
    pos = c > 0
    if not pos.any():
        return lo.astype(float)

    def phi(b: np.ndarray) -> np.ndarray:  # (x-1)^3/x at x = 2^b: the K at which b is stationary
        x = np.exp2(b)
        return (x - 1.0) ** 3 / x

    def bits_at(lam: float) -> np.ndarray:
        k = 2.0 * math.log(2.0) * c / (lam * w)  # (L,)
        return np.clip(np.log2(1.0 + _positive_root(k)), lo, hi)

    def total(b: np.ndarray) -> float:
        return float(np.sum(w * b + f))

    # lambda_min: every layer with c > 0 at hi; lambda_max: every layer at lo.
    k_scale = 2.0 * math.log(2.0) * c[pos] / w[pos]
    lam_lo = float(np.min(k_scale / phi(hi[pos]))) / 2.0
    lam_hi = float(np.max(k_scale / phi(lo[pos]))) * 2.0
    b = bits_at(lam_lo)
    if total(b) <= budget:
        return b
    log_lo, log_hi = math.log(lam_lo), math.log(lam_hi)
    for _ in range(80):
        mid = 0.5 * (log_lo + log_hi)
        if total(bits_at(math.exp(mid))) <= budget:
            log_hi = mid
        else:
            log_lo = mid
    return bits_at(math.exp(log_hi))


def _greedy_fill(
    c: np.ndarray, w: np.ndarray, f: np.ndarray, budget: float, table: np.ndarray, counts: np.ndarray, idx: np.ndarray
) -> np.ndarray:
    """From candidate indices `idx` (feasible), raise one step at a time by the best gain per cost that fits.

    Returns the new candidate indices.
    """
    idx = idx.copy()
    rows = np.arange(len(idx))
    bits = table[rows, idx]
    remaining = budget - cost(w, f, bits)
    slack = _REL_TOL * max(1.0, abs(budget))
    while True:
        has_next = idx + 1 < counts
        nxt = table[rows, np.minimum(idx + 1, counts - 1)]
        step_cost = w * (nxt - bits)
        gain = c * ((np.exp2(bits) - 1.0) ** -2 - (np.exp2(nxt) - 1.0) ** -2)
        ok = has_next & (step_cost <= remaining + slack) & (gain > 0)
        if not ok.any():
            return idx
        ratio = np.where(ok, gain / np.where(ok, step_cost, 1.0), -np.inf)
        l = int(np.argmax(ratio))
        idx[l] += 1
        bits[l] = nxt[l]
        remaining -= step_cost[l]


def _best_swap(
    c: np.ndarray, w: np.ndarray, f: np.ndarray, budget: float, table: np.ndarray, counts: np.ndarray, idx: np.ndarray
) -> np.ndarray | None:
    """The feasible one-step swap (raise layer i, lower layer j != i) that lowers the objective most, or None."""
    rows = np.arange(len(idx))
    bits = table[rows, idx]
    up = table[rows, np.minimum(idx + 1, counts - 1)]
    down = table[rows, np.maximum(idx - 1, 0)]
    omega = c * (np.exp2(bits) - 1.0) ** -2
    gain_up = np.where(idx + 1 < counts, omega - c * (np.exp2(up) - 1.0) ** -2, -np.inf)  # (L,)
    loss_down = np.where(idx > 0, c * (np.exp2(down) - 1.0) ** -2 - omega, np.inf)  # (L,)
    net = gain_up[:, None] - loss_down[None, :]  # (L, L): raise row, lower column
    extra = w[:, None] * (up - bits)[:, None] - w[None, :] * (bits - down)[None, :]
    remaining = budget - cost(w, f, bits) + _REL_TOL * max(1.0, abs(budget))
    net[(extra > remaining) | np.eye(len(idx), dtype=bool)] = -np.inf
    i, j = np.unravel_index(int(np.argmax(net)), net.shape)
    if not net[i, j] > 1e-12 * max(float(omega.sum()), 1e-300):
        return None
    new = idx.copy()
    new[i] += 1
    new[j] -= 1
    return new


def _positive_root(k: np.ndarray) -> np.ndarray:
    """The positive real root y of y^3 - k y - k = 0 (k >= 0), elementwise, by Cardano."""
    k = np.asarray(k, dtype=float)
    y = np.zeros_like(k)
    disc = k**2 / 4.0 - k**3 / 27.0  # > 0: one real root; < 0: three, take the largest
    one = (k > 0) & (disc >= 0)
    three = (k > 0) & (disc < 0)
    s = np.sqrt(disc[one])
    y[one] = np.cbrt(k[one] / 2.0 + s) + np.cbrt(k[one] / 2.0 - s)
    kt = k[three]
    y[three] = 2.0 * np.sqrt(kt / 3.0) * np.cos(np.arccos(np.clip(1.5 * np.sqrt(3.0 / kt), -1.0, 1.0)) / 3.0)
    return y


def _fits(total: float, budget: float) -> bool:
    return total <= budget + _REL_TOL * max(1.0, abs(budget))


def _vector(name: str, x: Sequence[float] | np.ndarray) -> np.ndarray:
    try:
        arr = np.asarray(x, dtype=float)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{name}={x!r}: must be a 1-D sequence of numbers") from e
    if arr.ndim != 1 or arr.size == 0:
        raise ConfigError(f"{name}: must be a non-empty 1-D sequence, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ConfigError(f"{name}={arr.tolist()}: all entries must be finite")
    return arr


def _check_lengths(**arrays: np.ndarray) -> None:
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ConfigError(f"{', '.join(lengths)}: lengths must be equal, got {lengths}")


def _check_w_f(w: np.ndarray, f: np.ndarray) -> None:
    if np.any(w <= 0):
        raise ConfigError(f"w={w.tolist()}: every entry must be > 0")
    if np.any(f < 0):
        raise ConfigError(f"f={f.tolist()}: every entry must be >= 0")


def _is_int(x: object) -> bool:
    return isinstance(x, int | np.integer) and not isinstance(x, bool | np.bool_)


def _candidate_table(
    candidates: Sequence[int], pinned: Sequence[int | None] | None, n_layers: int
) -> tuple[np.ndarray, np.ndarray]:
    """(L, K) table of each layer's allowed widths, padded with +inf, and the count per layer."""
    cands = tuple(candidates)
    if (
        not cands
        or not all(_is_int(b) and 1 <= b <= 8 for b in cands)
        or any(a >= b for a, b in zip(cands, cands[1:], strict=False))
    ):
        raise ConfigError(f"candidates={cands!r}: must be sorted, unique ints in 1..8")
    if pinned is None:
        pins: list[int | None] = [None] * n_layers
    else:
        pins = list(pinned)
        if len(pins) != n_layers:
            raise ConfigError(f"pinned: length {len(pins)} must equal the number of layers {n_layers}")
        for p in pins:
            if p is not None and not (_is_int(p) and 1 <= p <= 8):
                raise ConfigError(f"pinned={pins!r}: entries must be None or an int in 1..8, got {p!r}")
    table = np.full((n_layers, len(cands)), np.inf)
    counts = np.empty(n_layers, dtype=int)
    for l, p in enumerate(pins):
        if p is None:
            table[l] = cands
            counts[l] = len(cands)
        else:
            table[l, 0] = int(p)
            counts[l] = 1
    return table, counts


def _validate(
    c: Sequence[float] | np.ndarray,
    w: Sequence[float] | np.ndarray,
    f: Sequence[float] | np.ndarray,
    budget: float,
    candidates: Sequence[int],
    pinned: Sequence[int | None] | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    c_arr, w_arr, f_arr = _vector("c", c), _vector("w", w), _vector("f", f)
    _check_lengths(c=c_arr, w=w_arr, f=f_arr)
    if np.any(c_arr < 0):
        raise ConfigError(f"c={c_arr.tolist()}: every entry must be >= 0")
    _check_w_f(w_arr, f_arr)
    if not (isinstance(budget, int | float | np.floating | np.integer) and math.isfinite(budget)):
        raise ConfigError(f"budget={budget!r}: must be a finite number")
    table, counts = _candidate_table(candidates, pinned, len(c_arr))
    least = cost(w_arr, f_arr, table[:, 0])
    if not _fits(least, budget):
        avg = (least - float(f_arr.sum())) / float(w_arr.sum())
        raise ConfigError(
            f"budget={budget!r} is infeasible: the smallest feasible budget is {least!r} "
            f"(every layer at its smallest width; an average of {avg:.6g} bits per weight)"
        )
    return c_arr, w_arr, f_arr, table, counts
