"""Optimizers and learning-rate schedules from `cfg.optim` (optax)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

from framework.config_checks import Context, fail, one_of, positive

OPTIMIZERS = ('adamw', 'lamb', 'lars', 'sgd')
SCHEDULES = ('cosine', 'wsd', 'constant')


# --- the `optim` config section --------------------------------------------------------------------------------


def defaults() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name='adamw',          # adamw | lamb | lars | sgd
      lr=1e-3,
      schedule='cosine',     # cosine | wsd | constant, all after a linear warmup
      warmup_steps=20,
      decay_fraction=0.2,    # wsd: final fraction of steps spent decaying
      min_lr_ratio=0.1,
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      weight_decay=0.1,
      momentum=0.9,          # sgd, lars
      grad_clip=1.0,         # 0: off
      # ZeRO-1: optimizer moments are split over the batch's mesh axes too, not only as their parameters are, so
      # each data-parallel replica updates 1/N of them (N x less update work and moment memory per device).
      shard_state_over_data=True,
  ))


def validate(cfg, ctx: Context) -> None:
  del ctx
  o = cfg.optim
  one_of('optim.name', o.name, OPTIMIZERS)
  one_of('optim.schedule', o.schedule, SCHEDULES)
  positive(o, 'optim', 'lr', 'eps')
  if o.warmup_steps < 0:
    fail('optim.warmup_steps', f'must be >= 0, got {o.warmup_steps}')
  if not 0 < o.decay_fraction <= 1:
    fail('optim.decay_fraction', f'{o.decay_fraction} must be in (0, 1]')
  if not 0 <= o.min_lr_ratio <= 1:
    fail('optim.min_lr_ratio', f'{o.min_lr_ratio} must be in [0, 1]')
  for name in ('b1', 'b2', 'momentum'):
    if not 0 <= o[name] < 1:
      fail(f'optim.{name}', f'{o[name]} must be in [0, 1)')
  for name in ('weight_decay', 'grad_clip'):
    if o[name] < 0:
      fail(f'optim.{name}', f'must be >= 0 (0: off), got {o[name]}')


def structure(optim_cfg) -> dict:
  """The fields that fix the optimizer state's tree (see `make_optimizer`): a checkpoint restores only if these
  agree. SGD keeps a momentum buffer only when momentum > 0; clipping adds a level to the chain."""
  o = optim_cfg
  fields = {'optim.name': o.name, 'optim.grad_clip (on/off)': bool(o.grad_clip)}
  if o.name == 'sgd':
    fields['optim.momentum (on/off)'] = bool(o.momentum)
  return fields


def schedule(optim_cfg, total_steps: int) -> optax.Schedule:
  """Linear warmup, then cosine decay, warmup-stable-decay (linear decay over the last `decay_fraction`), or
  constant. All end at lr * min_lr_ratio except 'constant'."""
  o = optim_cfg
  peak, floor, warmup = o.lr, o.lr * o.min_lr_ratio, o.warmup_steps
  if o.schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total_steps, warmup + 1), floor)
  warm = optax.linear_schedule(0.0, peak, warmup) if warmup else optax.constant_schedule(peak)
  if o.schedule == 'constant':
    return optax.join_schedules([warm, optax.constant_schedule(peak)], [warmup])
  decay_steps = max(1, round(o.decay_fraction * total_steps))
  stable_end = max(warmup, total_steps - decay_steps)
  return optax.join_schedules(
      [warm, optax.constant_schedule(peak), optax.linear_schedule(peak, floor, decay_steps)],
      [warmup, stable_end])


# Parameters the optimizer never decays: norm scales (which scan stacks into [layers, d]) and the MoE router's
# expert biases, which get no gradient and move only by their own balancing rule (framework/models/moe_balance.py).
NO_DECAY = ('scale', 'expert_bias')


def decay_mask(params):
  """Weight decay and trust ratios on weight matrices only, never on the NO_DECAY parameters."""
  def decays(path, _):
    return getattr(path[-1], 'key', None) not in NO_DECAY
  return jax.tree_util.tree_map_with_path(decays, params)


def _is_stacked(path) -> bool:
  """nn.scan keeps every layer's parameters under 'layers', layer index first (models/transformer.py)."""
  return getattr(path[0], 'key', None) == 'layers'


def scale_by_layerwise_trust_ratio(trust_coefficient: float = 1.0, eps: float = 0.0):
  """LARS/LAMB's trust ratio, trust_coefficient * ||w|| / (||u|| + eps), per layer as the papers define it:
  for a scanned parameter stacked [layers, ...] each layer's slice gets its own ratio (optax's
  scale_by_trust_ratio would take one over all layers). A zero norm leaves the update as it is."""
  def update_fn(updates, state, params):
    def scale(path, u, w):
      axes = tuple(range(1, u.ndim)) if _is_stacked(path) and u.ndim > 1 else None
      w_norm = jnp.sqrt(jnp.sum(jnp.square(w.astype(jnp.float32)), axis=axes, keepdims=axes is not None))
      u_norm = jnp.sqrt(jnp.sum(jnp.square(u.astype(jnp.float32)), axis=axes, keepdims=axes is not None))
      ratio = jnp.where((w_norm > 0) & (u_norm > 0), trust_coefficient * w_norm / (u_norm + eps), 1.0)
      return (u * ratio).astype(u.dtype)
    return jax.tree_util.tree_map_with_path(scale, updates, params), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


def make_optimizer(optim_cfg, total_steps: int, lr: optax.Schedule | None = None) -> optax.GradientTransformation:
  """The configured optimizer, with `schedule(optim_cfg, total_steps)` or the given LR schedule."""
  o = optim_cfg
  lr = lr or schedule(o, total_steps)
  if o.name == 'adamw':
    opt = optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=decay_mask)
  elif o.name == 'lamb':  # optax.lamb has no trust-ratio mask: built here so norm scales skip it, as in LARS
    opt = optax.chain(optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=o.eps),
                      optax.add_decayed_weights(o.weight_decay, decay_mask),
                      optax.masked(scale_by_layerwise_trust_ratio(), decay_mask),
                      optax.scale_by_learning_rate(lr))
  elif o.name == 'lars':  # optax.lars' order and trust coefficient, with per-layer ratios
    opt = optax.chain(optax.add_decayed_weights(o.weight_decay, decay_mask),
                      optax.masked(scale_by_layerwise_trust_ratio(trust_coefficient=0.001), decay_mask),
                      optax.scale_by_learning_rate(lr),
                      optax.trace(decay=o.momentum))
  else:
    opt = optax.chain(optax.add_decayed_weights(o.weight_decay, decay_mask),
                      optax.sgd(lr, momentum=o.momentum or None))
  if o.grad_clip:
    opt = optax.chain(optax.clip_by_global_norm(o.grad_clip), opt)
  return opt
