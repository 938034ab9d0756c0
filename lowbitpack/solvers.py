"""Exact multiple-choice knapsack: pick one option per item, minimise total error under a total cost budget.

LowRA's bit allocation is this problem: items are output channels (rows) of every selected linear, options
are the bit widths {1, 2, 4}, cost is the exact number of stored bits of the row at that width and error is
its weighted quantisation error. With ~10^5-10^6 rows a plain MILP is slow, so we solve it exactly in three
steps, each of which keeps every optimal solution reachable:

1. **Lagrangian / LP bound.** For λ ≥ 0 let x(λ) pick, per row, argmin_b E[r,b] + λ·C[r,b]. The dual
   L(λ) = Σ_r min_b (E + λC) − λ·B is concave; its maximum λ* lies on a breakpoint and L(λ*) is the LP
   relaxation's optimum, a lower bound LB on every feasible integer solution. x(λ*) taken on the cheap
   side of λ* is feasible and gives an upper bound UB.
2. **Reduced-cost fixing.** With the reduced cost ρ[r,b] = E[r,b] + λ*C[r,b] − min_b' (E[r,b'] + λ*C[r,b'])
   ≥ 0, every feasible x satisfies f(x) ≥ LB + Σ_r ρ[r, x_r] (because λ*·cost(x) ≤ λ*·B). A solution better
   than UB therefore has Σ_r ρ[r, x_r] ≤ UB − LB, so any option with ρ > UB − LB cannot occur in it and is
   removed. Rows left with one option are fixed; typically only a few hundred rows stay free.
3. **Exact MILP on the core** (scipy.optimize.milp / HiGHS, relative gap 0) with the budget that the fixed
   rows leave. The better of the MILP solution and the incumbent is optimal.

Costs must be non-negative integers (bits); errors are floats. `brute_force_mckp` is the test oracle.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class InfeasibleBudget(ValueError):
    """The budget is below the cheapest choice (every item at its cheapest option)."""

    def __init__(self, min_cost: int, budget: int):
        self.min_cost, self.budget = min_cost, budget
        super().__init__(f"budget {budget} is below the minimum total cost {min_cost}")


@dataclass
class MCKPSolution:
    choice: np.ndarray          # [n] option index per item
    objective: float            # Σ errors of the choice
    cost: int                   # Σ costs of the choice (≤ budget)
    lower_bound: float          # a proven lower bound on the optimum (LP bound or MILP dual bound)
    optimal: bool               # True when proven optimal (within HiGHS' tolerance on the core)
    info: dict[str, Any] = field(default_factory=dict)


def _check(errors: np.ndarray, costs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    e = np.asarray(errors, dtype=np.float64)
    c = np.asarray(costs)
    if e.ndim != 2 or e.shape != c.shape or e.shape[1] < 1:
        raise ValueError(f"errors and costs must both be [n, m], got {e.shape} and {c.shape}")
    if not np.issubdtype(c.dtype, np.integer):
        if not np.all(np.equal(np.mod(c, 1), 0)):
            raise ValueError("costs must be integers")
    c = c.astype(np.int64)
    if (c < 0).any():
        raise ValueError("costs must be non-negative")
    if not np.isfinite(e).all():
        raise ValueError("errors must be finite")
    return e, c


def _choose(e: np.ndarray, c: np.ndarray, lam: float) -> np.ndarray:
    """argmin_b E + λC per row; ties go to the cheaper option (so the choice is monotone in λ)."""
    v = e + lam * c
    best = v.min(axis=1, keepdims=True)
    # among (near-)ties take the cheapest: a tie at λ is exactly a breakpoint
    tol = 1e-12 * np.maximum(np.abs(best), 1e-300)
    cand = np.where(v <= best + tol, c, np.iinfo(np.int64).max)
    return cand.argmin(axis=1)


def _cost(c: np.ndarray, choice: np.ndarray) -> int:
    return int(c[np.arange(len(choice)), choice].sum())


def _objective(e: np.ndarray, choice: np.ndarray) -> float:
    return float(e[np.arange(len(choice)), choice].sum())


def lagrangian_bound(errors: np.ndarray, costs: np.ndarray, budget: int) -> tuple[float, float, np.ndarray]:
    """(λ*, LB, feasible choice x(λ*)) for the MCKP; LB = max_λ L(λ) is the LP-relaxation optimum."""
    e, c = _check(errors, costs)
    n, m = e.shape
    # Breakpoints: λ at which a row is indifferent between a cheaper, worse and a dearer, better option.
    lams = []
    for a in range(m):
        for b in range(m):
            dc = c[:, b] - c[:, a]
            de = e[:, a] - e[:, b]
            ok = (dc > 0) & (de > 0)
            lams.append(de[ok] / dc[ok])
    bps = np.unique(np.concatenate(lams)) if lams else np.zeros(0)
    bps = bps[np.isfinite(bps) & (bps > 0)]
    # cost(x(λ)) is non-increasing in λ; find the smallest breakpoint where the cheap-side choice fits.
    if _cost(c, _choose(e, c, 0.0)) <= budget:
        lam = 0.0
    else:
        lo, hi = 0, len(bps) - 1
        if len(bps) == 0 or _cost(c, _choose(e, c, float(bps[hi]))) > budget:
            raise InfeasibleBudget(int(c.min(axis=1).sum()), budget)
        while lo < hi:
            mid = (lo + hi) // 2
            if _cost(c, _choose(e, c, float(bps[mid]))) <= budget:
                hi = mid
            else:
                lo = mid + 1
        lam = float(bps[lo])
    x = _choose(e, c, lam)
    lb = float((e + lam * c).min(axis=1).sum() - lam * budget)
    return lam, lb, x


def _increment_gcd(c: np.ndarray) -> int:
    """gcd of all cost differences within rows: every total cost is ≡ Σ cheapest costs (mod this)."""
    d = np.abs(c[:, :, None] - c[:, None, :]).reshape(-1)
    d = np.unique(d[d > 0])
    return int(np.gcd.reduce(d)) if len(d) else 1


def solve_mckp(errors: np.ndarray, costs: np.ndarray, budget: int, *, core_rows: int = 256,
               max_dp_cells: int = 300_000_000) -> MCKPSolution:
    """Minimise Σ_r errors[r, x_r] subject to Σ_r costs[r, x_r] ≤ budget (one option per row), exactly.

    Optimality proof (see module doc): with LB the Lagrangian bound at λ* and ρ the reduced costs, any
    solution with objective f has Σ_r ρ[r, x_r] ≤ f − LB. We solve the problem restricted to options with
    ρ ≤ δ exactly (other rows keep their Lagrangian choice); if the restricted optimum f_δ satisfies
    f_δ − LB ≤ δ, no solution using an option outside the restriction can beat it, so it is optimal.
    Otherwise δ grows to f_δ − LB and we solve once more (then the condition holds by construction).
    """
    t0 = time.perf_counter()
    e, c = _check(errors, costs)
    n, m = e.shape
    budget = int(budget)
    min_cost = int(c.min(axis=1).sum())
    if min_cost > budget:
        raise InfeasibleBudget(min_cost, budget)
    # Trivial case: the error-minimal choice (cheapest among equal errors) fits.
    emin = e.min(axis=1, keepdims=True)
    x0 = np.where(e <= emin, c, np.iinfo(np.int64).max).argmin(axis=1)
    if _cost(c, x0) <= budget:
        obj = _objective(e, x0)
        return MCKPSolution(x0, obj, _cost(c, x0), obj, True,
                            {"method": "unconstrained", "seconds": time.perf_counter() - t0, "rounds": []})
    # Totals move in steps of g from the all-cheapest cost: a tighter budget that no solution can tell apart.
    g = _increment_gcd(c)
    budget_eff = min_cost + g * ((budget - min_cost) // g)
    lam, lb, x = lagrangian_bound(e, c, budget_eff)
    best = x
    ub = _objective(e, x)
    info: dict[str, Any] = {"lambda": lam, "lp_bound": lb, "lagrangian_objective": ub, "cost_step": g,
                            "rounds": []}
    v = e + lam * c
    rho = v - v.min(axis=1, keepdims=True)
    rho[np.arange(n), x] = 0.0  # exact zero for the incumbent's own option (float noise otherwise)
    tol = 1e-12 * (abs(ub) + abs(lb) + 1e-300)  # float slack so rounding never drops a needed option
    rho_second = np.sort(rho, axis=1)[:, 1] if m > 1 else np.full(n, np.inf)
    k0 = min(core_rows, n - 1)
    delta = float(np.partition(rho_second, k0)[k0]) if n > 1 else 0.0
    slack_units = (budget_eff - _cost(c, x)) // g
    optimal = ub - lb <= tol
    while not optimal:
        keep = rho <= delta + tol
        keep[np.arange(n), x] = True
        core = np.flatnonzero(keep.sum(axis=1) > 1)
        rnd: dict[str, Any] = {"delta": delta, "core_rows": int(len(core))}
        info["rounds"].append(rnd)
        d = (c[core] - c[core, x[core]][:, None]) // g     # cost change of each option, in steps of g
        xc = _dp_core(rho[core], d, keep[core], int(slack_units), lam * g, max_dp_cells)
        if xc is None:
            info["stopped"] = f"core of {len(core)} rows too large for the exact DP"
            break
        cand = x.copy()
        cand[core] = xc
        if _cost(c, cand) <= budget and _objective(e, cand) < _objective(e, best):
            best = cand
        f = _objective(e, best)
        rnd["objective"] = f
        if f - lb <= delta + tol:
            optimal = True
            break
        if len(info["rounds"]) >= 3:  # cannot happen in exact arithmetic; guard against float trouble
            info["stopped"] = "no proof after three rounds"
            break
        delta = f - lb
    obj = _objective(e, best)
    info.update(method="Lagrangian bound + reduced-cost core + exact DP", seconds=time.perf_counter() - t0,
                final_gap=obj - lb)
    return MCKPSolution(best, obj, _cost(c, best), obj if optimal else lb, optimal, info)


def _dp_core(rho: np.ndarray, d: np.ndarray, allowed: np.ndarray, slack: int, lam_step: float,
             max_cells: int) -> np.ndarray | None:
    """Exact DP over the core rows: minimise Σ ρ − lam_step·Δ subject to Δ = Σ d ≤ slack.

    Equivalent to minimising the true objective (f − LB = Σρ + λ·g·(slack − Δ)). State = net cost change Δ.
    """
    k, m = rho.shape
    lo = int(np.where(allowed, d, 0).min(axis=1).sum())
    hi = int(np.where(allowed, d, 0).max(axis=1).sum())
    lo, hi = min(lo, 0), max(hi, 0)
    width = hi - lo + 1
    if width * max(k, 1) > max_cells:
        return None
    val = np.full(width, np.inf)
    val[-lo] = 0.0
    back = np.zeros((k, width), dtype=np.int8)
    for i in range(k):
        new = np.full(width, np.inf)
        arg = np.zeros(width, dtype=np.int8)
        for b in range(m):
            if not allowed[i, b]:
                continue
            s = int(d[i, b])
            shifted = np.full(width, np.inf)
            if s >= 0:
                shifted[s:] = val[:width - s] + rho[i, b]
            else:
                shifted[:width + s] = val[-s:] + rho[i, b]
            better = shifted < new
            new = np.where(better, shifted, new)
            arg = np.where(better, b, arg)
        val, back[i] = new, arg
    deltas = np.arange(lo, hi + 1)
    score = np.where(deltas <= slack, val - lam_step * deltas, np.inf)
    state = int(np.argmin(score))
    if not np.isfinite(score[state]):
        return None
    choice = np.zeros(k, dtype=np.int64)
    for i in range(k - 1, -1, -1):
        b = int(back[i, state])
        choice[i] = b
        state -= int(d[i, b])
    return choice


def brute_force_mckp(errors: np.ndarray, costs: np.ndarray, budget: int) -> tuple[float, np.ndarray]:
    """Optimum by enumerating every choice (test oracle; m**n choices)."""
    e, c = _check(errors, costs)
    n, m = e.shape
    best, best_x = np.inf, None
    for x in itertools.product(range(m), repeat=n):
        xa = np.array(x)
        if _cost(c, xa) <= budget:
            f = _objective(e, xa)
            if f < best:
                best, best_x = f, xa
    if best_x is None:
        raise InfeasibleBudget(int(c.min(axis=1).sum()), budget)
    return best, best_x
