"""Online gradient noise scale: B_simple = tr(Sigma) / |G|^2 ("An Empirical Model of Large-Batch Training").

Gradients measured at two batch sizes give unbiased estimates of both terms (McCandlish et al., appendix A):

  |G|^2     ~ (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
  tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1 / B_small - 1 / B_big)

Here G_small is a gradient-accumulation micro-batch's mean gradient (|G_small|^2 averaged over the step's
micro-batches) and G_big the step's accumulated mean gradient, so the estimate costs one squared norm per
micro-batch. Without accumulation (train.micro_batches=1) on a batch split over N >= 2 devices, G_small is one
batch shard's gradient (what a device computes before the all-reduce) and G_big their mean (train.py,
`_per_shard_grads`); that costs each device a whole gradient's memory instead of its fsdp slice. Batch sizes are
in tokens (the loss is a per-token mean), so B_simple is in tokens; divide by the sequence length for sequences. Each estimate is noisy, so both terms are smoothed with a bias-corrected EMA over
steps before their ratio is taken; the EMA state is saved with each checkpoint so a resumed run continues it.
"""
from __future__ import annotations

import ml_collections

from framework.config_checks import Context, fail
from framework.mesh import shard_count
from framework.models.attention import resolve_impl


def defaults() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      enabled=False,  # estimate during training (micro-batches, or batch shards when train.micro_batches=1)
      ema=0.95,       # smoothing of each term, per step
  ))


def validate(cfg, ctx: Context) -> None:
  n = cfg.noise_scale
  if not 0 <= n.ema < 1:
    fail('noise_scale.ema', f'{n.ema} must be in [0, 1)')
  if not n.enabled or cfg.train.micro_batches >= 2:
    return
  shards, _ = shard_count(ctx.rules, ctx.sizes, 'batch')
  if shards < 2:
    fail('noise_scale.enabled', "the estimate compares micro-batch (or batch-shard) gradients with the step's: set "
         'train.micro_batches >= 2, or shard the batch over 2 or more devices')
  attention = resolve_impl(cfg.model.attention_impl, backend=ctx.backend)
  if cfg.moe.num_experts or attention == 'pallas':
    fail('noise_scale.enabled', 'the per-shard estimate (train.micro_batches=1) runs the model under a vmap over '
         "batch shards, which the MoE dispatch and the Pallas attention's shard_map do not take: set "
         'train.micro_batches >= 2')


def two_batch_estimates(small_sq: float, big_sq: float, b_small: float, b_big: float) -> tuple[float, float]:
  """Unbiased (|G|^2, tr(Sigma)) from mean squared gradient norms at batch sizes b_small < b_big."""
  if not 0 < b_small < b_big:
    raise ValueError(f'two_batch_estimates: need 0 < b_small < b_big, got {b_small}, {b_big}')
  g2 = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
  trace = (small_sq - big_sq) / (1.0 / b_small - 1.0 / b_big)
  return g2, trace


class NoiseScale:
  """Bias-corrected EMAs of |G|^2 and tr(Sigma) over steps; `update` takes a step's metrics (see train.py)."""

  def __init__(self, ema: float, state: dict | None = None):
    self.ema = ema
    state = state or {}
    self.g2 = float(state.get('g2', 0.0))
    self.trace = float(state.get('trace', 0.0))
    self.steps = int(state.get('steps', 0))
    self.last_step = int(state.get('last_step', -1))

  def observe(self, step: int, metrics: dict) -> None:
    """update() with step `step`'s metrics, once per step however often the driver sees them."""
    if step > self.last_step:
      self.update(metrics)
      self.last_step = step

  def update(self, metrics: dict) -> dict[str, float]:
    g2, trace = two_batch_estimates(float(metrics['gns_small_sq']), float(metrics['gns_big_sq']),
                                    float(metrics['gns_b_small']), float(metrics['gns_b_big']))
    self.g2 = self.ema * self.g2 + (1 - self.ema) * g2
    self.trace = self.ema * self.trace + (1 - self.ema) * trace
    self.steps += 1
    return self.values()

  def values(self) -> dict[str, float]:
    if not self.steps:
      return {}
    correction = 1 - self.ema ** self.steps
    g2, trace = self.g2 / correction, self.trace / correction
    return {'noise_g2': g2, 'noise_trace': trace, 'b_simple': trace / g2 if g2 > 0 else float('inf')}

  def state(self) -> dict:
    return {'g2': self.g2, 'trace': self.trace, 'steps': self.steps, 'last_step': self.last_step}
