"""Rules that carry tuned optimizer settings from a reference batch size to another one, and the `scaling` section.

A config names the batch size its learning rate, Adam beta2 and weight decay were tuned at
(`scaling.reference_batch_size`, in sequences; 0 = off). When the run's `train.batch_size` differs, `apply`
rescales them by the configured rules before anything is built, and the launch logs every value it changed and
why. The sequence length is the same for both batch sizes, so a ratio of batch sizes is a ratio of tokens.

- Learning rate ('linear': Goyal et al., "Accurate, Large Minibatch SGD", eta proportional to B, the SGD rule;
  'sqrt': eta proportional to sqrt(B), the rule for Adam-type optimizers (Malladi et al., "On the SDEs and Scaling
  Rules for Adaptive Gradient Algorithms"); both hold only below the critical batch size).
- Adam beta2 ('half_life': "Small Batch Size Training for Language Models"): keep the second-moment average's
  half-life fixed in tokens, beta2' = beta2 ** (B' / B).
- AdamW weight decay ('timescale': "Power Lines", Bergsma et al.): keep tau = B / (eta * lambda * D) fixed, with D
  the tokens of the run, so lambda' = lambda * (B' / B) * (eta / eta').
"""
from __future__ import annotations

import math

import ml_collections

from framework.config_checks import Context, fail, non_negative, one_of

LR_RULES = ('none', 'linear', 'sqrt')
BETA2_RULES = ('none', 'half_life')
WEIGHT_DECAY_RULES = ('none', 'timescale')


def defaults() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      reference_batch_size=0,         # sequences the optim values were tuned at; 0: use them as they are
      lr_rule='sqrt',                 # none | linear | sqrt
      beta2_rule='half_life',         # none | half_life
      weight_decay_rule='timescale',  # none | timescale
  ))


def validate(cfg, ctx: Context) -> None:
  del ctx
  s = cfg.scaling
  non_negative(s, 'scaling', 'reference_batch_size')
  one_of('scaling.lr_rule', s.lr_rule, LR_RULES)
  one_of('scaling.beta2_rule', s.beta2_rule, BETA2_RULES)
  one_of('scaling.weight_decay_rule', s.weight_decay_rule, WEIGHT_DECAY_RULES)


def scale_lr(lr: float, ratio: float, rule: str) -> float:
  """The learning rate for a batch `ratio` times the reference one."""
  return {'none': lr, 'linear': lr * ratio, 'sqrt': lr * math.sqrt(ratio)}[rule]


def scale_beta2(beta2: float, ratio: float) -> float:
  """beta2 with its half-life in tokens kept: a step sees `ratio` times the tokens, so it decays `ratio` times."""
  return beta2 ** ratio


def scale_weight_decay(weight_decay: float, ratio: float, lr: float, new_lr: float) -> float:
  """AdamW's decay with the timescale B / (lr * decay * D) kept, D fixed."""
  return weight_decay * ratio * lr / new_lr


def apply(cfg) -> list[tuple[str, float, float, str]]:
  """Rescales cfg.optim in place for train.batch_size; returns (field, old, new, why) for every changed value."""
  reference = cfg.scaling.reference_batch_size
  if not reference or reference == cfg.train.batch_size:
    return []
  return rescale(cfg, cfg.train.batch_size, reference,
                 f'train.batch_size={cfg.train.batch_size} vs scaling.reference_batch_size={reference}')


def rescale(cfg, batch_size: int, reference: int, batches: str) -> list[tuple[str, float, float, str]]:
  """Rescales cfg.optim in place from `reference` sequences to `batch_size` by cfg.scaling's rules; `batches`
  says which two sizes (for the log). Returns (field, old, new, why) for every changed value."""
  s, o = cfg.scaling, cfg.optim
  if batch_size == reference:
    return []
  ratio = batch_size / reference
  changes = []
  lr = scale_lr(o.lr, ratio, s.lr_rule)
  if s.lr_rule != 'none':
    changes.append(('optim.lr', o.lr, lr, f'{s.lr_rule} rule, {batches}'))
  if s.beta2_rule == 'half_life' and o.name in ('adamw', 'lamb'):
    changes.append(('optim.b2', o.b2, scale_beta2(o.b2, ratio), f'beta2 half-life kept in tokens, {batches}'))
  if s.weight_decay_rule == 'timescale' and o.weight_decay:
    changes.append(('optim.weight_decay', o.weight_decay, scale_weight_decay(o.weight_decay, ratio, o.lr, lr),
                    f'AdamW timescale B/(lr*decay*D) kept, {batches}'))
  with cfg.unlocked():
    for field, _, new, _ in changes:
      o[field.split('.')[1]] = float(new)
  if not 0 <= o.b2 < 1:
    fail('scaling.reference_batch_size', f'rescaling to batch {batch_size} gives optim.b2={o.b2}, outside [0, 1)')
  return changes
