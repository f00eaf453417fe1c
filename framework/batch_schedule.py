"""Batch-size schedules: a ladder of global batch sizes, climbed by token thresholds (a ramp) or by a norm test
(adaptive), and the `batch_schedule` section.

The ladder is `batch_schedule.sizes` (sequences, ascending) and ends at `train.batch_size`. The micro-batch
keeps the size it has at the top (train.batch_size / train.micro_batches rows), so a rung changes only the
number of micro-batches: the model, its shardings and the per-device memory stay the same, and each rung
compiles its step once. The batch never shrinks.

- 'ramp' (as Megatron's batch-size ramp, with thresholds in tokens): rung i + 1 starts at the first step
  boundary where the tokens seen reach `ramp_tokens[i]`.
- 'adaptive' (the norm test of "AdAdaGrad: Adaptive Batch Size Schemes for Adaptive Gradient Methods"): every
  `check_every` steps the batch b passes if Var(per-example gradient) / b <= theta^2 |G|^2; otherwise it grows to
  Var / (theta^2 |G|^2) rounded up to the next rung. Var and |G|^2 are the noise-scale estimate's tr(Sigma) and
  |G|^2 (framework/noise_scale.py: the two-batch estimator over micro-batches, EMA-smoothed), so the test reads
  b >= B_simple / theta^2, in tokens.

Under a schedule the run length is an example budget, train.steps x train.batch_size examples, and the
learning-rate schedule (warmup and decay) runs in examples: optim.warmup_steps and train.steps count steps of
train.batch_size. Each rung's LR, Adam beta2 and weight decay are rescaled from the reference batch size
(scaling.reference_batch_size, or train.batch_size when that is 0) by the `scaling` rules, and logged. The data
position is an example offset, so a change skips and repeats no example; the rung in effect is saved with each
checkpoint, so a resumed run continues on it bit for bit.
"""
from __future__ import annotations

import dataclasses
import math

import ml_collections
import optax

from framework import optim, scaling
from framework.config_checks import Context, fail, one_of, positive

MODES = ('fixed', 'ramp', 'adaptive')


def defaults() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      mode='fixed',     # fixed | ramp | adaptive
      sizes=(),         # the ladder of global batch sizes (sequences), ascending, ending at train.batch_size
      ramp_tokens=(),   # ramp: tokens seen at which each next rung starts (one per rung after the first)
      theta=0.5,        # adaptive: the norm test's tolerance (smaller grows sooner)
      check_every=10,   # adaptive: steps between norm tests
  ))


def validate(cfg, ctx: Context) -> None:
  b, t = cfg.batch_schedule, cfg.train
  one_of('batch_schedule.mode', b.mode, MODES)
  if b.mode == 'fixed':
    return
  sizes = tuple(b.sizes)
  if len(sizes) < 2 or any(not isinstance(s, int) or s <= 0 for s in sizes) or list(sizes) != sorted(set(sizes)):
    fail('batch_schedule.sizes', f'{sizes!r}: give two or more positive batch sizes in ascending order, e.g. '
         f'({t.batch_size // 4}, {t.batch_size // 2}, {t.batch_size})')
  if sizes[-1] != t.batch_size:
    fail('batch_schedule.sizes', f'the ladder must end at train.batch_size={t.batch_size}, got {sizes!r}')
  micro = t.batch_size // t.micro_batches
  for s in sizes:
    if s % micro:
      fail('batch_schedule.sizes', f'{s} is not a multiple of the micro-batch (train.batch_size / '
           f'train.micro_batches = {micro} rows); every rung keeps that micro-batch and changes their number')
  if b.mode == 'ramp':
    thresholds = tuple(b.ramp_tokens)
    if len(thresholds) != len(sizes) - 1 or list(thresholds) != sorted(thresholds) or min(thresholds) <= 0:
      fail('batch_schedule.ramp_tokens', f'{thresholds!r}: give {len(sizes) - 1} ascending positive token counts, '
           'one for the start of each rung after the first')
  if b.mode == 'adaptive':
    positive(b, 'batch_schedule', 'theta', 'check_every')
    if not cfg.noise_scale.enabled:
      fail('batch_schedule.mode', "'adaptive' tests the batch with the noise-scale estimate: set "
           'noise_scale.enabled=True')
  from framework import config as config_lib  # pylint: disable=import-outside-toplevel  (it imports this module)
  for size in sizes[:-1]:  # each rung is a whole config, checked by the same schema (MoE groups, noise scale, ...)
    try:
      config_lib.validate(rung_config(cfg, size)[0], num_devices=ctx.num_devices, backend=ctx.backend)
    except ValueError as e:
      fail('batch_schedule.sizes', f'the rung at batch {size} is not a valid run: {e}')


def ramp_batch_size(tokens_seen: int, sizes: tuple[int, ...], thresholds: tuple[int, ...]) -> int:
  """The ramp's batch size once `tokens_seen` tokens are done: sizes[i] from thresholds[i - 1] on."""
  return sizes[sum(tokens_seen >= t for t in thresholds)]


def norm_test_batch(trace: float, g2: float, theta: float) -> float:
  """The batch (in the units of the estimate, tokens here) that passes the norm test Var / b <= theta^2 |G|^2,
  with Var = tr(Sigma). A non-positive |G|^2 estimate (the noise swamps the signal) asks for no finite batch."""
  return trace / (theta ** 2 * g2) if g2 > 0 else math.inf


@dataclasses.dataclass(frozen=True)
class Rung:
  """A batch size in effect from a step and example offset on (what the LR schedule and resume need)."""
  batch_size: int
  start_step: int
  start_example: int


def rung_config(cfg, batch_size: int):
  """A copy of `cfg` that trains one rung at a fixed batch size, and the optimizer changes the rules made for it.

  The micro-batch keeps its top-rung size; LR, beta2 and weight decay are rescaled from the reference batch."""
  rung = cfg.copy_and_resolve_references()
  micro = cfg.train.batch_size // cfg.train.micro_batches
  reference = cfg.scaling.reference_batch_size or cfg.train.batch_size
  with rung.unlocked():
    rung.train.update(batch_size=batch_size, micro_batches=batch_size // micro)
    rung.batch_schedule.update(mode='fixed', sizes=(), ramp_tokens=())
  changes = scaling.rescale(rung, batch_size, reference,
                            f'batch {batch_size} vs reference {reference} (batch_schedule rung)')
  return rung, changes


def lr_in_examples(rung_cfg, top_cfg, rung: Rung) -> optax.Schedule:
  """The rung's LR by step: the configured schedule (in steps of train.batch_size) at the examples seen."""
  base = optim.schedule(rung_cfg.optim, top_cfg.train.steps)
  top, b = top_cfg.train.batch_size, rung.batch_size

  def lr(step):
    return base((rung.start_example + (step - rung.start_step) * b) / top)
  return lr


class BatchSchedule:
  """The ladder's state during a run: the rung in effect, when the run ends, and when to climb."""

  def __init__(self, cfg, saved: dict | None = None, step: int = 0, example: int = 0):
    """`saved`: the rung a checkpoint was written on (its `state()`); without one the first rung starts at
    (step, example), where the run (or a resume of a run that had no schedule) begins."""
    b = cfg.batch_schedule
    self.mode, self.seq_len = b.mode, cfg.data.seq_len
    self.sizes = tuple(b.sizes) or (cfg.train.batch_size,)
    self.thresholds, self.theta, self.check_every = tuple(b.ramp_tokens), b.theta, b.check_every
    self.steps, self.total_examples = cfg.train.steps, cfg.train.steps * cfg.train.batch_size
    self.rung = Rung(self.sizes[0], step, example)
    if saved and not self.fixed:
      self.rung = Rung(int(saved['batch_size']), int(saved['start_step']), int(saved['start_example']))
      if self.rung.batch_size not in self.sizes:
        fail('batch_schedule.sizes', f'the checkpoint trains at batch {self.rung.batch_size}, which is not on the '
             f'ladder {self.sizes}; restore the ladder it was saved with or use a new --workdir')

  @property
  def fixed(self) -> bool:
    return self.mode == 'fixed'

  def finished(self, step: int, example: int) -> bool:
    """Fixed batch: train.steps steps; a schedule: the example budget (the last step may run past it)."""
    return step >= self.steps if self.fixed else example >= self.total_examples

  def progress(self, step: int, example: int) -> float:
    return step / self.steps if self.fixed else example / self.total_examples

  def needs_metrics(self, step: int) -> bool:
    """Whether `climb` after `step` reads the noise estimate (so the step's metrics must be fetched first)."""
    return self.mode == 'adaptive' and step % self.check_every == 0

  def climb(self, step: int, example: int, noise_values: dict) -> Rung | None:
    """The new rung from step `step` on (example offset `example`), or None to stay."""
    current = self.rung.batch_size
    if self.mode == 'ramp':
      target = ramp_batch_size(example * self.seq_len, self.sizes, self.thresholds)
    elif self.needs_metrics(step) and noise_values:
      need = norm_test_batch(noise_values['noise_trace'], noise_values['noise_g2'], self.theta) / self.seq_len
      target = next((s for s in self.sizes if s >= need), self.sizes[-1])
    else:
      return None
    if target <= current:
      return None
    self.rung = Rung(target, step, example)
    return self.rung

  def state(self) -> dict:
    return dataclasses.asdict(self.rung)
