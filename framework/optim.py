"""Optimizers and learning-rate schedules from `cfg.optim` (optax)."""
from __future__ import annotations

import jax
import optax


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


def decay_mask(params):
  """Weight decay on weight matrices only, never on norm scales (which scan stacks into [layers, d])."""
  def decays(path, _):
    return getattr(path[-1], 'key', None) != 'scale'
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(optim_cfg, total_steps: int) -> optax.GradientTransformation:
  o = optim_cfg
  lr = schedule(o, total_steps)
  if o.name == 'adamw':
    opt = optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=decay_mask)
  elif o.name == 'lamb':
    opt = optax.lamb(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=decay_mask)
  elif o.name == 'lars':
    opt = optax.lars(lr, weight_decay=o.weight_decay, weight_decay_mask=decay_mask, trust_ratio_mask=decay_mask,
                     momentum=o.momentum)
  else:
    opt = optax.chain(optax.add_decayed_weights(o.weight_decay, decay_mask),
                      optax.sgd(lr, momentum=o.momentum or None))
  if o.grad_clip:
    opt = optax.chain(optax.clip_by_global_norm(o.grad_clip), opt)
  return opt
