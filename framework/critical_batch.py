"""Critical batch size from a batch-size sweep: the steps/examples hyperbola and the 20% rule.

"An Empirical Model of Large-Batch Training" (McCandlish et al.): the steps S and examples E a run at batch B
needs to reach a target loss obey (S / S_min - 1)(E / E_min - 1) = 1 with E = S B, i.e.
S(B) = S_min (1 + B_crit / B) and E(B) = E_min (1 + B / B_crit), B_crit = E_min / S_min: at B_crit a run takes
twice the minimum steps and twice the minimum examples.

"How Does Critical Batch Size Scale in Pre-training?" (Zhang et al.): the critical batch size is where the steps
to the target exceed perfect linear scaling (from the smallest batch measured) by 20%.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from scipy import optimize


@dataclasses.dataclass(frozen=True)
class Hyperbola:
  s_min: float       # steps at an infinite batch
  e_min: float       # examples at an infinitesimal batch
  b_crit: float      # e_min / s_min, in the batch's units
  rms_log_error: float  # root mean square of log(S measured / S fitted): 0.1 is ~10% off per point

  def steps(self, batch):
    return self.s_min * (1 + self.b_crit / np.asarray(batch, dtype=float))

  def examples(self, batch):
    return self.e_min * (1 + np.asarray(batch, dtype=float) / self.b_crit)


def fit_hyperbola(batch_sizes, steps) -> Hyperbola:
  """Least squares in log S of S(B) = S_min (1 + B_crit / B) over the measured (B, S) points."""
  b, s = np.asarray(batch_sizes, dtype=float), np.asarray(steps, dtype=float)
  if len(b) < 3 or np.any(b <= 0) or np.any(s <= 0):
    raise ValueError(f'fit_hyperbola: need three or more points with positive batch sizes and steps, got '
                     f'{list(zip(b.tolist(), s.tolist()))}')

  def residuals(log_params):
    s_min, b_crit = np.exp(log_params)
    return np.log(s) - np.log(s_min * (1 + b_crit / b))
  start = np.log([s.min() / 2, np.sqrt(b.min() * b.max())])
  fit = optimize.least_squares(residuals, start)
  s_min, b_crit = np.exp(fit.x)
  return Hyperbola(s_min=float(s_min), e_min=float(s_min * b_crit), b_crit=float(b_crit),
                   rms_log_error=float(np.sqrt(np.mean(residuals(fit.x) ** 2))))


def linear_scaling_cbs(batch_sizes, steps, excess: float = 0.2) -> float | None:
  """The batch size at which steps-to-target first exceed perfect linear scaling from the smallest batch,
  S(B0) B0 / B, by `excess` (interpolated in log B between the points around the crossing). None if no
  measured batch exceeds it; the largest batch measured is then a lower bound."""
  order = np.argsort(batch_sizes)
  b, s = np.asarray(batch_sizes, dtype=float)[order], np.asarray(steps, dtype=float)[order]
  overshoot = s / (s[0] * b[0] / b) - 1  # 0 at the smallest batch by construction
  above = np.nonzero(overshoot > excess)[0]
  if not len(above):
    return None
  i = above[0]
  lo, hi = np.log(b[i - 1]), np.log(b[i])
  t = (excess - overshoot[i - 1]) / (overshoot[i] - overshoot[i - 1])
  return float(np.exp(lo + t * (hi - lo)))


def crossing(xs, losses, target: float) -> float | None:
  """Where a decreasing loss curve first reaches `target`, linearly interpolated between the two evaluations
  around it (x: steps or examples); None if it never does."""
  for i, loss in enumerate(losses):
    if loss <= target:
      if i == 0:
        return float(xs[0])
      x0, x1, l0, l1 = xs[i - 1], xs[i], losses[i - 1], loss
      return float(x0 + (l0 - target) / (l0 - l1) * (x1 - x0))
  return None
