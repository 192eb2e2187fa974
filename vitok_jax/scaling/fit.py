"""Power-law fits for scaling studies (shared/REFERENCE.md, "Power-law fits").

Single law: y = a·x^b, or y = c + a·x^b with an irreducible term c; both fitted in log space (the
residual is log y − log ŷ, so every decade of x weighs the same), with R² of log y and t intervals
from the fit's covariance, s²·(JᵀJ)⁻¹ with n − p degrees of freedom (J: d log ŷ / dθ). For
a·x^b this is ordinary least squares on (log x, log y), whose t interval is exact for Gaussian
log-space noise. A case-resampling bootstrap is not used: at the sizes of a sweep (3–8 runs) its
95% intervals covered the true exponent in 69% / 88% / 91% of simulated fits with 3 / 5 / 8
points, as every resample refits a subset of the same few points.

Two-variable law (Chinchilla form): L(N, D) = E + A/N^α + B/D^β, a Huber loss (δ = 1e-3) on log
residuals, minimised by L-BFGS (scipy) from the best points of a grid of starts. With compute
C = k·N·D (k = FLOPs per parameter and sample, 6 for a transformer's train step) the loss-optimal
split is N*(C) = G·(C/k)^(β/(α+β)), D*(C) = (C/k)/N*, G = (αA / βB)^(1/(α+β)).
"""
from __future__ import annotations

import itertools
import math

import numpy as np
from scipy import optimize, special, stats

HUBER_DELTA = 1e-3


def _r2(target: np.ndarray, prediction: np.ndarray) -> float:
  """Coefficient of determination of `prediction` for `target` (both already in log space)."""
  total = np.sum((target - target.mean()) ** 2)
  return float(1.0 - np.sum((target - prediction) ** 2) / total) if total > 0 else float("nan")


def _check_positive(**arrays) -> list[np.ndarray]:
  out = []
  for name, values in arrays.items():
    values = np.asarray(values, np.float64).ravel()
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
      raise ValueError(f"power-law fits need finite, positive {name}; got {values}")
    out.append(values)
  return out


def _fit_pure(log_x: np.ndarray, log_y: np.ndarray) -> dict:
  """log y = log a + b·log x by least squares."""
  b, log_a = np.polyfit(log_x, log_y, 1)
  return {"a": float(np.exp(log_a)), "b": float(b)}


def _fit_offset(x: np.ndarray, log_y: np.ndarray) -> dict:
  """y = c + a·x^b, minimising Σ(log y − log ŷ)² over (c, log|a|, b) for both signs of a.

  a > 0, b < 0 is a loss falling to a floor c; a < 0, b < 0 a score (PSNR) rising to a ceiling c.
  """
  y = np.exp(log_y)
  scale = np.median(x)  # x / scale keeps x^b well conditioned for x ~ 1e9 FLOPs.
  xs = x / scale
  best = None
  for sign in (1.0, -1.0):
    def residual(theta, sign=sign):
      c, log_abs_a, b = theta
      with np.errstate(over="ignore"):  # Steps of the search far out: an inf, not a warning.
        pred = c + sign * np.exp(log_abs_a) * xs ** b
      return log_y - np.log(np.maximum(pred, 1e-300))
    # Floor (ceiling) just below (above) the data; a few exponents.
    c0 = 0.5 * y.min() if sign > 0 else 1.5 * y.max()
    for b0 in (-1.0, -0.3, 0.3, 1.0):
      theta0 = (c0, math.log(max(abs(np.median(y) - c0), 1e-12)), b0)
      sol = optimize.least_squares(residual, theta0, method="lm" if len(y) > 3 else "trf")
      if np.all(np.isfinite(sol.fun)) and (best is None or sol.cost < best[0]):
        c, log_abs_a, b = sol.x
        best = (sol.cost, {"a": float(sign * np.exp(log_abs_a) / scale ** b), "b": float(b),
                           "c": float(c)})
  if best is None:
    raise ValueError("offset power-law fit failed for every start")
  return best[1]


def fit_power_law(x, y, *, offset: bool = False, ci: float = 0.95) -> dict:
  """Fits y = a·x^b (or y = c + a·x^b with `offset`) in log space.

  Args:
    x, y: [n] positive values (e.g. x = E, y = eval/l2 or eval/psnr).
    offset: also fit the irreducible term c.
    ci: the central probability of the t intervals (see the module docstring).
  Returns:
    {"form", "a", "b", ["c"], "r2" (of log y), "n", "ci": {param: [lo, hi]}, "ci_level",
     "dof" (n − parameters), "covariance" (of θ = (log|a|, b[, c]), for `confidence_band`)}.
  Raises:
    ValueError: for fewer distinct x than the law's parameters + 1 (3 for a·x^b, 4 with c):
      through as many points as parameters the law fits exactly, R² is 1 by construction and
      there are no degrees of freedom left for an interval.
  """
  x, y = _check_positive(x=x, y=y)
  if len(x) != len(y):
    raise ValueError(f"x and y differ in length: {len(x)} vs {len(y)}")
  min_distinct = _num_params(offset) + 1
  if len(np.unique(x)) < min_distinct:
    raise ValueError(
        f"fitting {'c + a*x^b' if offset else 'a*x^b'} needs >= {min_distinct} distinct x values "
        f"(more than its {min_distinct - 1} parameters, or it fits exactly and has no R² or CI); "
        f"got {np.unique(x)}")
  log_y = np.log(y)
  best = _fit_offset(x, log_y) if offset else _fit_pure(np.log(x), log_y)
  log_prediction = np.log(np.maximum(predict_power_law(best, x), 1e-300))
  dof = len(x) - _num_params(offset)
  covariance = _covariance(_log_jacobian(best, x), log_y - log_prediction, dof)
  t = stats.t.ppf(0.5 + ci / 2, dof)
  variance = np.diag(covariance)
  with np.errstate(invalid="ignore"):  # A negative or undefined variance: no interval (NaN).
    half = t * np.sqrt(variance)
  warnings = [] if np.all(np.isfinite(variance) & (variance >= 0)) else [
      f"the data do not determine {'c + a*x^b' if offset else 'a*x^b'}: its parameters' "
      f"covariance is not positive, so their intervals are undefined"
      + (" (try it without the offset)" if offset else "")]
  log_abs_a = math.log(abs(best["a"]))
  with np.errstate(over="ignore"):  # A badly determined a: an interval out to ±inf.
    a_ends = np.sign(best["a"]) * np.exp([log_abs_a - half[0], log_abs_a + half[0]])
  intervals = {"a": sorted(a_ends),
               "b": [best["b"] - half[1], best["b"] + half[1]]}
  if offset:
    intervals["c"] = [best["c"] - half[2], best["c"] + half[2]]
  return {"form": "c + a*x^b" if offset else "a*x^b", **best, "r2": _r2(log_y, log_prediction),
          "n": int(len(x)), "ci": {k: [float(v) for v in lo_hi] for k, lo_hi in intervals.items()},
          "ci_level": ci, "dof": int(dof), "covariance": covariance.tolist(), "warnings": warnings}


def _num_params(offset: bool) -> int:
  return 3 if offset else 2


def _log_jacobian(fit: dict, x) -> np.ndarray:
  """[n, p]: d log ŷ / dθ at x, θ = (log|a|, b[, c]); for a·x^b the rows are (1, log x)."""
  x = np.asarray(x, np.float64)
  power = fit["a"] * x ** fit["b"]
  prediction = fit.get("c", 0.0) + power
  columns = [power / prediction, power * np.log(x) / prediction]
  if "c" in fit:
    columns.append(1.0 / prediction)
  return np.stack(columns, axis=-1)


def _covariance(jacobian: np.ndarray, residual: np.ndarray, dof: int) -> np.ndarray:
  """s²·(JᵀJ)⁻¹, s² = Σr²/dof; infinite where JᵀJ is singular (a parameter the points do not
  determine)."""
  try:
    inverse = np.linalg.inv(jacobian.T @ jacobian)
  except np.linalg.LinAlgError:
    return np.full((jacobian.shape[1],) * 2, np.inf)
  return float(residual @ residual) / dof * inverse


def confidence_band(fit: dict, x) -> tuple[np.ndarray, np.ndarray]:
  """(lo, hi): the pointwise t interval of the fitted law ŷ(x) at the fit's CI level (log ŷ ±
  t·√(g Σ gᵀ), g = d log ŷ / dθ at x): where the law itself lies, not where new runs land."""
  g = _log_jacobian(fit, x)
  spread = np.sqrt(np.einsum("np,pq,nq->n", g, np.asarray(fit["covariance"]), g))
  half = stats.t.ppf(0.5 + fit["ci_level"] / 2, fit["dof"]) * spread
  prediction = predict_power_law(fit, x)
  return prediction * np.exp(-half), prediction * np.exp(half)


def predict_power_law(fit: dict, x) -> np.ndarray:
  """ŷ of a `fit_power_law` result at x."""
  x = np.asarray(x, np.float64)
  return fit.get("c", 0.0) + fit["a"] * x ** fit["b"]


# --- Two-variable law L(N, D) = E + A/N^α + B/D^β ----------------------------------------------

# Starting grid over θ = (log E, log A, log B, α, β); Chinchilla's grid, a little coarser.
_GRID = dict(log_e=(-2.0, -1.0, 0.0, 1.0), log_a=(0.0, 5.0, 10.0, 15.0, 20.0),
             log_b=(0.0, 5.0, 10.0, 15.0, 20.0), alpha=(0.1, 0.3, 0.6, 1.0, 1.5),
             beta=(0.1, 0.3, 0.6, 1.0, 1.5))

# Box for L-BFGS-B: keeps exp(θ) finite when the data barely constrain a term.
_BOUNDS = [(-20.0, 20.0), (-40.0, 80.0), (-40.0, 80.0), (0.0, 5.0), (0.0, 5.0)]


def _huber(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
  """Huber loss of residuals r and its derivative."""
  small = np.abs(r) <= delta
  loss = np.where(small, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta))
  return loss, np.clip(r, -delta, delta)


def _chinchilla_terms(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray) -> np.ndarray:
  """[..., 3, n] log of the three terms E, A/N^α, B/D^β for θ of shape [..., 5]."""
  log_e, log_a, log_b, alpha, beta = np.moveaxis(np.asarray(theta), -1, 0)
  return np.stack([np.broadcast_to(log_e[..., None], log_a[..., None].shape[:-1] + log_n.shape),
                   log_a[..., None] - alpha[..., None] * log_n,
                   log_b[..., None] - beta[..., None] * log_d], axis=-2)


def _chinchilla_objective(theta, log_n, log_d, log_l, delta):
  """Mean Huber loss of log L̂ − log L and its gradient in θ."""
  terms = _chinchilla_terms(theta, log_n, log_d)                      # [3, n]
  log_pred = special.logsumexp(terms, axis=0)
  loss, dloss = _huber(log_pred - log_l, delta)
  weights = np.exp(terms - log_pred) * dloss / len(log_l)            # d mean / d term, [3, n]
  grad = np.array([weights[0].sum(), weights[1].sum(), weights[2].sum(),
                   -(weights[1] * log_n).sum(), -(weights[2] * log_d).sum()])
  return float(loss.mean()), grad


def fit_two_variable(n, d, loss, *, delta: float = HUBER_DELTA, num_starts: int = 8,
                     n_boot: int = 0, ci: float = 0.95, seed: int = 0) -> dict:
  """Fits L(N, D) = E + A/N^α + B/D^β (Hoffmann et al. 2022, approach 3).

  Args:
    n, d, loss: [k] model sizes (parameters), data sizes (examples or tokens seen) and losses.
    delta: Huber δ on log residuals.
    num_starts: L-BFGS runs, from the grid points with the lowest objective.
    n_boot: bootstrap resamples for CIs of every parameter (0 = none); a resample that does not
      span >= 2 values of each of N and D (α or β unidentified) is drawn again.
  Returns:
    {"E", "A", "B", "alpha", "beta", "objective", "r2" (of log L), "n", "a_exponent" = β/(α+β)
     (N* ∝ C^a), "b_exponent" = α/(α+β) (D* ∝ C^b), ["ci": {param: [lo, hi]}]}.
  """
  n, d, loss = _check_positive(n=n, d=d, loss=loss)
  if len(np.unique(n)) < 2 or len(np.unique(d)) < 2 or len(n) < 6:
    raise ValueError(f"L(N, D) has 5 parameters: it needs >= 6 runs spanning >= 2 values of "
                     f"each of N and D; got {len(n)} runs, N {np.unique(n)}, D {np.unique(d)}")
  log_n, log_d, log_l = np.log(n), np.log(d), np.log(loss)
  grid = np.array(list(itertools.product(*_GRID.values())))           # [G, 5]

  def fit_one(ix, starts):
    args = (log_n[ix], log_d[ix], log_l[ix], delta)
    # Rank starts by the objective, vectorised over the whole grid (cheap), then refine the best.
    log_pred = special.logsumexp(_chinchilla_terms(starts, *args[:2]), axis=-2)
    ranked = starts[np.argsort(_huber(log_pred - args[2], delta)[0].mean(-1))[:num_starts]]
    best = None
    for theta0 in ranked:
      sol = optimize.minimize(_chinchilla_objective, theta0, args=args, jac=True,
                              method="L-BFGS-B", bounds=_BOUNDS,
                              options=dict(maxiter=2000, gtol=1e-12, ftol=1e-15))
      if best is None or sol.fun < best.fun:
        best = sol
    return best

  sol = fit_one(np.arange(len(n)), grid)
  result = _chinchilla_result(sol.x)
  log_pred = special.logsumexp(_chinchilla_terms(sol.x, log_n, log_d), axis=0)
  r2 = _r2(log_l, log_pred)
  result.update(objective=float(sol.fun), r2=r2, n=int(len(n)), delta=delta,
                warnings=_two_variable_warnings(sol.x, r2))
  if n_boot:
    samples = [_chinchilla_result(fit_one(ix, sol.x[None]).x)
               for ix in two_variable_resamples(n, d, n_boot, seed=seed)]
    tail = 100 * (1 - ci) / 2
    result["ci"] = {k: [float(v) for v in np.percentile([s[k] for s in samples],
                                                        [tail, 100 - tail])]
                    for k in ("E", "A", "B", "alpha", "beta")}
    result["ci_level"] = ci
  return result


def _two_variable_warnings(theta: np.ndarray, r2: float) -> list[str]:
  """What makes a two-variable fit meaningless: parameters on the edge of the search box (the
  runs do not determine them) or a negative R² (worse than the mean of log L)."""
  names = ("log E", "log A", "log B", "alpha", "beta")
  at_bound = [name for name, value, (lo, hi) in zip(names, theta, _BOUNDS)
              if min(value - lo, hi - value) <= 1e-6 * (hi - lo)]
  out = []
  if at_bound:
    out.append(f"{', '.join(at_bound)} on the edge of the search box {_BOUNDS}: the runs do not "
               "determine them")
  if not r2 >= 0:
    out.append(f"R² {r2:.3f}: the law fits log L worse than its mean")
  return out


def two_variable_resamples(n, d, n_boot: int, *, seed: int = 0) -> list[np.ndarray]:
  """`n_boot` bootstrap index sets over the runs, each spanning >= 2 values of N and of D (a set
  that does not is drawn again: the law has no α or β to fit on it)."""
  n, d = np.asarray(n), np.asarray(d)
  rng, out = np.random.default_rng(seed), []
  while len(out) < n_boot:
    ix = rng.integers(0, len(n), len(n))
    if len(np.unique(n[ix])) >= 2 and len(np.unique(d[ix])) >= 2:
      out.append(ix)
  return out


def _chinchilla_result(theta: np.ndarray) -> dict:
  log_e, log_a, log_b, alpha, beta = (float(t) for t in theta)
  return {"E": math.exp(log_e), "A": math.exp(log_a), "B": math.exp(log_b), "alpha": alpha,
          "beta": beta, "a_exponent": beta / (alpha + beta), "b_exponent": alpha / (alpha + beta)}


def predict_two_variable(fit: dict, n, d) -> np.ndarray:
  """L̂(N, D) of a `fit_two_variable` result."""
  n, d = np.asarray(n, np.float64), np.asarray(d, np.float64)
  return fit["E"] + fit["A"] / n ** fit["alpha"] + fit["B"] / d ** fit["beta"]


def compute_optimal(fit: dict, compute, flops_per_param_sample: float = 6.0) -> dict:
  """The loss-optimal N*, D*, L* at compute C = k·N·D under a two-variable fit.

  Args:
    compute: [m] training FLOPs.
    flops_per_param_sample: k; 6 for a transformer (2 forward + 4 backward FLOPs per parameter).
  Returns:
    {"compute", "n", "d", "loss"} as [m] arrays; n ∝ C^(β/(α+β)).
  """
  compute = np.asarray(compute, np.float64)
  alpha, beta = fit["alpha"], fit["beta"]
  g = (alpha * fit["A"] / (beta * fit["B"])) ** (1.0 / (alpha + beta))
  n = g * (compute / flops_per_param_sample) ** (beta / (alpha + beta))
  d = compute / flops_per_param_sample / n
  return {"compute": compute, "n": n, "d": d, "loss": predict_two_variable(fit, n, d)}


def pareto_frontier(compute, metric, *, higher_is_better: bool = False) -> np.ndarray:
  """Indices of the runs on the empirical compute frontier: better than every cheaper run.

  Of runs with equal compute only the best is kept. Returns the indices sorted by compute.
  """
  compute, metric = np.asarray(compute, np.float64), np.asarray(metric, np.float64)
  sign = -1.0 if higher_is_better else 1.0
  frontier, best = [], math.inf
  for i in np.argsort(compute, kind="stable"):
    if np.isfinite(metric[i]) and sign * metric[i] < best:
      if frontier and compute[frontier[-1]] == compute[i]:
        frontier.pop()
      frontier.append(int(i))
      best = sign * metric[i]
  return np.array(frontier, dtype=int)
