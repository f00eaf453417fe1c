"""The training loop: validate, build, resume, step, log, evaluate, checkpoint, stop cleanly on divergence."""
from __future__ import annotations

import json
import signal
import sys
import threading
import time
from typing import Sequence

import jax
import numpy as np
from absl import logging

from framework import batch_schedule
from framework import checkpoint as ckpt_lib
from framework import config as config_lib
from framework import data as data_lib
from framework import data_identity
from framework import metrics as metrics_lib
from framework import resume
from framework import noise_scale
from framework import scaling
from framework import storage
from framework.mesh import make_sharder
from framework.models.transformer import num_params
from framework import train as train_lib
from framework.train import Trainer


class NonFiniteLossError(RuntimeError):
  """Training diverged; the checkpoints on disk are all from before the divergence."""


def evaluate(trainer: Trainer, params, heldout, cfg) -> dict[str, float]:
  """Mean held-out loss over `train.eval_batches` fixed batches (the same ones every time)."""
  ce_sum = tokens = 0.0
  shard, shards = trainer.data_shard()
  for batch in data_lib.eval_batches(heldout, cfg.train.eval_batches, seed=cfg.seed,
                                     global_batch=cfg.train.batch_size, seq_len=cfg.data.seq_len,
                                     process_index=shard, process_count=shards):
    out = jax.device_get(trainer.eval_step(params, trainer.device_batch(batch)))
    ce_sum += float(out['ce_sum'])
    tokens += float(out['tokens'])
  loss = ce_sum / max(tokens, 1.0)
  return {'eval_loss': loss, 'eval_bits_per_token': loss / np.log(2)}


def _raise_if_diverged(step: int, metrics: dict, last_saved: int | None, directory: str) -> None:
  if not bool(metrics['finite']):
    kept = f'the last good checkpoint is step {last_saved} in {directory}' if last_saved else 'no checkpoint was kept'
    raise NonFiniteLossError(
        f'Non-finite training at step {step}: loss={float(metrics["loss"])}, grad_norm='
        f'{float(metrics["grad_norm"])}; stopped without saving it, {kept}. Lower optim.lr or raise '
        'optim.warmup_steps, then rerun the same command to resume from that checkpoint.')


class _StopRequest:
  """SIGTERM / SIGINT (preemption, Ctrl-C) ask the loop to checkpoint the current step and stop cleanly.

  One process: our handlers set a flag, read at each step boundary. Several processes: every one must save the
  same step, so jax's preemption service (started by jax.distributed.initialize) catches SIGTERM on whichever
  process gets it, tells the others through the coordination service, and `reached_preemption_sync_point`
  turns true at the same step on all of them (the largest step any has reached, plus one).
  """

  def __init__(self):
    self.requested, self.signal_name, self._previous = False, '', {}
    self._coordinated = jax.process_count() > 1 and _preemption_service_running()
    if jax.process_count() != 1 or threading.current_thread() is not threading.main_thread():
      return
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    self.requested, self.signal_name = True, signal.Signals(signum).name

  def check(self, step: int) -> bool:
    """Whether to save and stop after `step`; call once per step, on every process."""
    if self._coordinated and not self.requested:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      if multihost_utils.reached_preemption_sync_point(step):
        self.requested, self.signal_name = True, 'SIGTERM to one of the processes (the preemption sync point)'
    return self.requested

  def restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _preemption_service_running() -> bool:
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  running = getattr(jax_distributed.global_state, 'preemption_sync_manager', None) is not None
  if not running:
    logging.warning('jax\'s preemption service is off (jax_enable_preemption_service): a SIGTERM to one process '
                    'of this multi-process job will not save a checkpoint')
  return running


def _resume_example(checkpointer, step: int, data_state: dict, batch_size: int) -> int:
  """The first example the resumed run reads: the checkpoint's example offset, so a run resumed with another
  train.batch_size neither skips nor repeats an example (a checkpoint from before offsets were saved: its step
  times the batch size it was saved with)."""
  saved_batch = checkpointer.saved_json(step, 'config').get('train', {}).get('batch_size', batch_size)
  example = int(data_state.get('next_example', int(data_state['next_step']) * saved_batch))
  if saved_batch != batch_size:
    logging.warning('train.batch_size is %d, the checkpoint was written with %d: resuming at example %d of the '
                    'stream, so no example is skipped or seen twice', batch_size, saved_batch, example)
  return example


def _check_device_rows(saved: int | None, current: int) -> None:
  """Warns when a resumed run (elastic: other devices or mesh) puts more rows on each device per micro-batch
  than the run that saved the checkpoint, which may not fit the memory that run fit in."""
  if saved and current > saved:
    logging.warning('Each batch shard now holds %d rows per micro-batch; the run that saved this checkpoint held '
                    '%d. If it runs out of memory, set train.device_batch=%d: the micro-batch count then follows '
                    'the device count', current, saved, saved)


def _observe(noise, step: int, metrics: dict) -> None:
  """Feeds a step's metrics to the noise-scale estimate (framework/noise_scale.py), when it is on."""
  if noise is not None:
    noise.observe(step, metrics)


def _log_progress(done: int, steps: int, record: dict, eta: float, schedule) -> None:
  speed = (f"  {record['tokens_per_s']:.0f} tok/s  MFU {100 * record['mfu']:.1f}%" if 'tokens_per_s' in record
           else '')
  evaluation = f"  eval {record['eval_loss']:.4f}" if 'eval_loss' in record else ''
  where = (f'step {done}/{steps}' if schedule.fixed else
           f"step {done}  examples {record['examples']}/{schedule.total_examples}  batch {record['batch_size']}")
  logging.info('%s  loss %.4f%s  lr %.2e  grad_norm %.3f%s  ETA %s', where, record['loss'], evaluation,
               record['lr'], record['grad_norm'], speed, metrics_lib.format_duration(eta))


def _log_scaling(changes) -> None:
  for field, old, new, why in changes:
    logging.info('scaling: %s %.6g -> %.6g (%s)', field, old, new, why)


def _rung_trainer(cfg, base: Trainer, schedule, cache: dict) -> Trainer:
  """The Trainer for the batch schedule's rung in effect (the base one for a fixed batch), built once per rung
  with its rescaled optimizer values logged (framework/batch_schedule.py)."""
  rung = schedule.rung
  if schedule.fixed:
    return base
  if rung not in cache:
    rung_cfg, changes = batch_schedule.rung_config(cfg, rung.batch_size)
    _log_scaling(changes)
    cache[rung] = Trainer(rung_cfg, base.sharder, lr_schedule=batch_schedule.lr_in_examples(rung_cfg, cfg, rung))
  return cache[rung]


def _open_batches(train_data, cfg, trainer: Trainer, step: int, example: int) -> data_lib.DataIterator:
  shard, shards = trainer.data_shard()
  return data_lib.DataIterator(train_data, start_step=step, start_example=example, seed=cfg.seed,
                               global_batch=trainer.cfg.train.batch_size, seq_len=cfg.data.seq_len,
                               process_index=shard, process_count=shards, prefetch=cfg.data.prefetch)


def train(cfg, workdir: str, devices: Sequence[jax.Device] | None = None, *,
          allow_data_change: bool = False) -> dict:
  """Trains `cfg` in `workdir`, resuming from its latest complete checkpoint. Returns the last logged metrics.

  Everything a user can get wrong (the config, the workdir, the data, a checkpoint that does not fit) is
  refused with a ValueError before anything compiles. `allow_data_change` resumes on a data stream other than
  the checkpoint's, with a loud warning.
  """
  began = time.perf_counter()
  devices = list(jax.devices() if devices is None else devices)
  cfg, micro_note = train_lib.resolve_micro_batches(cfg, len(devices))
  config_lib.validate(cfg, num_devices=len(devices), backend=devices[0].platform)
  cfg = cfg.copy_and_resolve_references()
  if cfg.batch_schedule.mode == 'fixed':  # a schedule rescales each rung as it starts (_rung_trainer)
    _log_scaling(scaling.apply(cfg))
  resume.check_workdir(workdir)
  root = storage.workdir_path(workdir)
  train_data, heldout = data_lib.load_splits(cfg.data)
  for split in (train_data, heldout):
    data_lib.check_vocab(split, cfg.model.vocab_size)
  data_record = data_identity.describe(cfg, train_data, heldout)
  data_identity.check_processes_agree(data_record)

  checkpointer, latest = None, None
  if cfg.checkpoint.enabled:
    checkpointer = ckpt_lib.Checkpointer(root / 'checkpoints', cfg.checkpoint)
    latest = checkpointer.latest_step()
    if latest is not None:
      try:
        resume.check_resume(checkpointer, latest, cfg, data_record, allow_data_change)
      except ValueError:
        checkpointer.close()
        raise
  root.mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    (root / 'config.json').write_text(json.dumps(ckpt_lib.config_to_json(cfg), indent=2), encoding='utf-8')

  # The base trainer initialises, restores and evaluates (at train.batch_size, so evaluations compare across
  # a batch schedule's rungs); each rung's own trainer takes the steps.
  trainer = Trainer(cfg, make_sharder(cfg, devices))
  state, start, start_example, data_state = None, 0, 0, {}
  t = cfg.train
  if micro_note:
    logging.info(micro_note)
  if latest is not None:
    state, data_state = checkpointer.restore(latest, trainer.abstract_state)
    start = int(data_state['next_step'])
    start_example = _resume_example(checkpointer, latest, data_state, t.batch_size)
    logging.info('Resumed from %s/%d (data position: step %d, example %d)', checkpointer.directory, latest, start,
                 start_example)
    _check_device_rows(data_state.get('device_rows'), trainer.device_rows)
  else:
    state = trainer.init(jax.random.key(cfg.seed))
  try:
    schedule = batch_schedule.BatchSchedule(cfg, data_state.get('batch_schedule'), start, start_example)
  except ValueError:
    if checkpointer:
      checkpointer.close()
    raise

  steps = t.steps
  noise = None
  if cfg.noise_scale.enabled:  # continues the saved EMA on resume
    noise = noise_scale.NoiseScale(cfg.noise_scale.ema, data_state.get('noise_scale'))
  peak, peak_source = metrics_lib.peak_flops(devices, cfg.metrics.peak_flops_per_device)
  logging.info('Model: %.2fM parameters, %.3g FLOPs/token; mesh %s; peak %.3g FLOP/s (%s)',
               num_params(state.params) / 1e6, trainer.flops_per_token, dict(trainer.sharder.mesh.shape), peak,
               peak_source)
  if schedule.finished(start, start_example):
    logging.info('Nothing to do: the checkpoint is at step %d, example %d (train.steps=%d)', start, start_example,
                 steps)
    if checkpointer:
      checkpointer.close()
    return {'step': start, 'examples': start_example}

  writer = metrics_lib.MetricsWriter(root, cfg.metrics.tensorboard, resume_step=start)
  rung_trainers: dict = {}
  stepper = _rung_trainer(cfg, trainer, schedule, rung_trainers)
  batches = _open_batches(train_data, cfg, stepper, start, start_example)
  last_saved = checkpointer.latest_step() if checkpointer else None
  record: dict = {}
  pending = None
  run_start = window_start = None
  run_start_progress, window_steps, window_tokens = 0.0, 0, 0
  stop = _StopRequest()
  done, example = start, start_example
  try:
    while not schedule.finished(done, example):
      step_batch = stepper.cfg.train.batch_size
      state, metrics = stepper.train_step(state, stepper.device_batch(next(batches)))
      done, example = done + 1, example + step_batch
      if pending is not None:  # a step behind, so the device is never idle waiting on the host
        pending_values = jax.device_get(pending[1])
        _raise_if_diverged(pending[0], pending_values, last_saved, workdir)
        _observe(noise, pending[0], pending_values)
      pending = (done, metrics)
      if window_start is None:  # the first step (of a run or a rung) includes compilation: time from its end
        jax.block_until_ready(metrics)
        window_start = time.perf_counter()
        if run_start is None:
          run_start, run_start_progress = window_start, schedule.progress(done, example)
      else:
        window_steps += 1
        window_tokens += step_batch * cfg.data.seq_len
      is_last = schedule.finished(done, example)
      stopping = stop.check(done)  # read once: a signal arriving mid-iteration waits for the next step
      do_log = done % t.log_every == 0 or is_last
      do_eval = bool(t.eval_every) and (done % t.eval_every == 0 or is_last)
      do_save = checkpointer is not None and (done % cfg.checkpoint.every_steps == 0 or is_last or stopping)
      values = (jax.device_get(metrics) if (do_log or do_eval or do_save or schedule.needs_metrics(done))
                else None)
      if values is not None:
        _raise_if_diverged(done, values, last_saved, workdir)
        _observe(noise, done, values)
      if do_log or do_eval:
        record = {k: v for k, v in values.items() if k != 'finite'}
        record.update(examples=example, batch_size=step_batch, elapsed_s=time.perf_counter() - began)
        if noise is not None:
          record.update(noise.values())
        if window_steps:  # steps timed since the last log / eval / save, compilation and those excluded
          elapsed = time.perf_counter() - window_start
          tokens_per_s = window_tokens / elapsed
          record.update(tokens_per_s=tokens_per_s, mfu=trainer.flops_per_token * tokens_per_s / peak,
                        step_time_s=elapsed / window_steps)
        if do_eval:
          record.update(evaluate(trainer, state.params, heldout, cfg))
          if t.target_eval_loss and record['eval_loss'] <= t.target_eval_loss:
            logging.info('Reached train.target_eval_loss=%g at step %d (eval loss %.4f): stopping', t.target_eval_loss,
                         done, record['eval_loss'])
            record['reached_target'] = True
            stopping, do_save = True, checkpointer is not None
        writer.write(done, record)
        if do_log and jax.process_index() == 0:
          progress = schedule.progress(done, example)
          rate = (progress - run_start_progress) / max(time.perf_counter() - run_start, 1e-9)
          _log_progress(done, steps, record, eta=(1 - progress) / rate if rate > 0 else 0.0, schedule=schedule)
      if do_log or do_eval or do_save:
        window_start, window_steps, window_tokens = time.perf_counter(), 0, 0
      if not is_last and schedule.climb(done, example, noise.values() if noise is not None else {}):
        logging.info('batch_schedule: batch %d -> %d from step %d (example %d, %s)', step_batch,
                     schedule.rung.batch_size, done, example,
                     'tokens seen' if schedule.mode == 'ramp' else 'norm test failed')
        batches.close()
        stepper = _rung_trainer(cfg, trainer, schedule, rung_trainers)
        batches = _open_batches(train_data, cfg, stepper, done, example)
        window_start, window_steps, window_tokens = None, 0, 0
      if do_save:
        data_state = {**batches.state(), 'stream': data_record, 'batch_schedule': schedule.state(),
                      'device_rows': stepper.device_rows}
        if noise is not None:
          data_state['noise_scale'] = noise.state()
        if checkpointer.save(done, state, data_state,
                             ckpt_lib.config_to_json(cfg), force=True):
          last_saved = done
      if stopping:
        if not record.get('reached_target'):
          logging.warning('Stopping at step %d on %s%s; rerun the same command to resume', done, stop.signal_name,
                          ' after saving a checkpoint' if do_save else '')
        break
    if pending is not None:
      _raise_if_diverged(pending[0], jax.device_get(pending[1]), last_saved, workdir)
    if checkpointer:
      checkpointer.wait()  # success means the last checkpoint is on disk
  finally:
    in_flight = sys.exc_info()[1]  # the error (if any) that brought us here
    stop.restore()
    batches.close()
    writer.close()
    if checkpointer:
      try:
        checkpointer.close()
      except Exception:  # pylint: disable=broad-except
        if in_flight is None:
          raise
        logging.exception('Closing the checkpointer failed too, while handling: %s', in_flight)
  return {'step': done, 'examples': example, **record}
