"""Batch-size schedules (framework/batch_schedule.py): the ramp and the norm test on hand-computed values, clear
errors, exact data offsets across rung changes, per-rung rescaling logged, and a resumed adaptive run equal to an
uninterrupted one bit for bit."""
import json
import logging as py_logging
import math

import jax
import numpy as np
import pytest

from framework import batch_schedule
from framework import config as config_lib
from framework import data as data_lib
from framework import loop


def test_ramp_batch_size_by_tokens_seen():
  sizes, thresholds = (4, 8, 16), (1000, 5000)
  assert [batch_schedule.ramp_batch_size(t, sizes, thresholds) for t in (0, 999, 1000, 4999, 5000, 10**9)] == [
      4, 4, 8, 8, 16, 16]


def test_norm_test_batch():
  # Var / b <= theta^2 |G|^2  <=>  b >= Var / (theta^2 |G|^2) = 200 / (0.25 * 0.5) = 1600.
  assert batch_schedule.norm_test_batch(200.0, 0.5, 0.5) == pytest.approx(1600.0)
  assert batch_schedule.norm_test_batch(200.0, -1e-3, 0.5) == math.inf


def _cfg(mode='ramp', steps=4, **schedule):
  cfg = config_lib.defaults()
  cfg.model.update(d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=64, max_seq_len=32)
  cfg.data.update(seq_len=32, max_corpus_bytes=2_000_000, prefetch=2)
  cfg.train.update(steps=steps, batch_size=16, micro_batches=4, log_every=1, eval_every=0)
  cfg.optim.update(lr=1e-3, warmup_steps=2, schedule='cosine')
  cfg.scaling.reference_batch_size = 8
  cfg.batch_schedule.update(mode=mode, sizes=(8, 12, 16), **schedule)
  if mode == 'ramp':
    cfg.batch_schedule.ramp_tokens = (16 * 32, 40 * 32)
  cfg.checkpoint.update(every_steps=100, async_save=False)  # saves at the end, or when stopped
  cfg.metrics.update(peak_flops_per_device=1e12, tensorboard=False)
  return cfg


@pytest.mark.parametrize('field,value,match', [
    ('sizes', (8, 16, 12), 'ascending'),
    ('sizes', (4, 8), 'must end at train.batch_size=16'),
    ('sizes', (6, 16), 'not a multiple of the micro-batch'),
    ('ramp_tokens', (512,), 'give 2 ascending'),
    ('mode', 'cyclic', 'not one of'),
])
def test_bad_schedules_name_the_field(field, value, match):
  cfg = _cfg()
  cfg.batch_schedule[field] = value
  with pytest.raises(ValueError, match=f'config batch_schedule.{field}: .*{match}'):
    config_lib.validate(cfg, num_devices=1)


def test_adaptive_needs_the_noise_estimate():
  with pytest.raises(ValueError, match='batch_schedule.mode.*noise_scale.enabled=True'):
    config_lib.validate(_cfg('adaptive'), num_devices=1)


def test_each_rung_is_checked_as_a_whole_run():
  cfg = _cfg()
  cfg.noise_scale.enabled = True
  cfg.batch_schedule.update(sizes=(4, 16), ramp_tokens=(512,))  # one micro-batch on one device: no noise estimate
  with pytest.raises(ValueError, match='batch_schedule.sizes: the rung at batch 4 is not a valid run: config '
                     'noise_scale.enabled'):
    config_lib.validate(cfg, num_devices=1)


def test_lr_runs_in_examples_across_rungs():
  cfg = _cfg()
  rung_cfg, _ = batch_schedule.rung_config(cfg, 8)
  # A rung of 8 that started at step 3, example 40: step 5 is example 56 = 3.5 steps of the top batch (16).
  lr = batch_schedule.lr_in_examples(rung_cfg, cfg, batch_schedule.Rung(8, 3, 40))
  from framework import optim  # pylint: disable=import-outside-toplevel
  assert float(lr(5)) == pytest.approx(float(optim.schedule(rung_cfg.optim, 4)(3.5)))
  assert rung_cfg.train.micro_batches == 2 and rung_cfg.train.batch_size == 8


def _consumed(monkeypatch):
  """Records (first example, rows, inputs) of every batch the loop takes from a DataIterator."""
  seen = []
  original = data_lib.DataIterator.__next__

  def recording(self):
    first, rows = self._next_example, self._global_batch  # pylint: disable=protected-access
    batch = original(self)
    seen.append((first, rows, batch['inputs']))
    return batch
  monkeypatch.setattr(data_lib.DataIterator, '__next__', recording)
  return seen


def _records(workdir):
  return [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]


def test_ramp_keeps_exact_data_offsets_and_rescales_each_rung(tmp_path, monkeypatch, caplog):
  seen = _consumed(monkeypatch)
  cfg = _cfg(steps=4)
  cfg.checkpoint.enabled = False
  # A budget of 64 examples: 2 x 8, then 12 from 16 examples (512 tokens), 16 from 40
  with caplog.at_level(py_logging.INFO, logger='absl'):
    out = loop.train(cfg, str(tmp_path), devices=jax.devices()[:1])
  assert [(first, rows) for first, rows, _ in seen] == [(0, 8), (8, 8), (16, 12), (28, 12), (40, 16), (56, 16)]
  assert out['examples'] == 72 and out['step'] == 6  # the budget is reached inside the last step
  # The examples seen are the fixed-order stream's first 72, in order, none skipped or repeated.
  train_data, _ = data_lib.load_splits(cfg.data)
  stream = data_lib.batch_at(train_data, 0, seed=cfg.seed, global_batch=72, seq_len=32)['inputs']
  np.testing.assert_array_equal(np.concatenate([x for _, _, x in seen]), stream)
  assert [r['batch_size'] for r in _records(tmp_path)] == [8, 8, 12, 12, 16, 16]
  messages = [r.getMessage() for r in caplog.records]
  assert 'batch_schedule: batch 8 -> 12 from step 2 (example 16, tokens seen)' in messages
  # Rescaled from the reference batch 8 at each rung: sqrt rule for the LR.
  assert 'scaling: optim.lr 0.001 -> 0.00122474 (sqrt rule, batch 12 vs reference 8 (batch_schedule rung))' in messages
  assert 'scaling: optim.lr 0.001 -> 0.00141421 (sqrt rule, batch 16 vs reference 8 (batch_schedule rung))' in messages


class _StopAfter:
  """A stand-in for the loop's signal handler that asks it to stop after `n` steps."""

  def __init__(self, n):
    self.n, self.signal_name = n, 'SIGTERM (test)'

  def check(self, step):
    del step
    self.n -= 1
    return self.n < 0

  def restore(self):
    pass


def _adaptive_cfg():
  cfg = _cfg('adaptive', steps=5, theta=0.5, check_every=2)
  cfg.noise_scale.update(enabled=True, ema=0.5)
  return cfg


def test_adaptive_run_grows_and_resumes_bit_for_bit(tmp_path, monkeypatch):
  cfg = _adaptive_cfg()
  straight, resumed = tmp_path / 'straight', tmp_path / 'resumed'
  seen = _consumed(monkeypatch)
  loop.train(cfg, str(straight), devices=jax.devices()[:1])
  starts = [first for first, _, _ in seen]  # each batch starts where the one before ended, whatever its size
  assert starts == [0] + list(np.cumsum([rows for _, rows, _ in seen])[:-1])
  monkeypatch.setattr(loop, '_StopRequest', lambda: _StopAfter(3))
  loop.train(cfg, str(resumed), devices=jax.devices()[:1])
  assert len(_records(resumed)) == 4  # stopped at step 4, on the rung the norm test chose at step 4
  monkeypatch.undo()
  loop.train(cfg, str(resumed), devices=jax.devices()[:1])
  a, b = _records(straight), _records(resumed)
  sizes = [r['batch_size'] for r in a]
  assert sizes == sorted(sizes) and sizes[-1] > 8  # it grew, and never shrank
  # Each size change happens only right after a norm test (every check_every = 2 steps).
  assert all(r['step'] % 2 == 1 for r, prev in zip(a[1:], a) if r['batch_size'] != prev['batch_size'])
  assert [(r['step'], r['batch_size'], r['loss'], r['b_simple']) for r in a] == [
      (r['step'], r['batch_size'], r['loss'], r['b_simple']) for r in b]
  assert a[-1]['examples'] == b[-1]['examples'] >= 80


def test_adaptive_run_resumes_onto_another_device_count(tmp_path, monkeypatch):
  """Stopped on 1 device, resumed on 2 (data parallel): the rung in effect carries over, and the batches read
  before and after the resume tile the stream, none skipped or repeated."""
  cfg = _adaptive_cfg()
  monkeypatch.setattr(loop, '_StopRequest', lambda: _StopAfter(3))
  seen = _consumed(monkeypatch)
  loop.train(cfg, str(tmp_path), devices=jax.devices()[:1])
  before = _records(tmp_path)
  monkeypatch.setattr(loop, '_StopRequest', lambda: _StopAfter(10**6))  # runs to the end
  on_two = _adaptive_cfg()
  on_two.mesh.update(data=2)
  loop.train(on_two, str(tmp_path), devices=jax.devices()[:2])
  after = _records(tmp_path)
  assert after[:len(before)] == before and len(after) > len(before)
  assert after[len(before)]['batch_size'] >= before[-1]['batch_size']  # the saved rung (or a later one), not 8
  starts = [first for first, _, _ in seen]
  assert starts == [0] + list(np.cumsum([rows for _, rows, _ in seen])[:-1])
  assert after[-1]['examples'] == sum(rows for _, rows, _ in seen)
