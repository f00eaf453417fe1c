"""metrics.jsonl survives a crash mid-write, the peak FLOP/s comes from the right table entry or a sound
measurement, and the training loop's rows carry consistent tokens/s, MFU and step time."""
import functools
import json
import logging
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from framework import config as config_lib
from framework import loop
from framework import metrics


class _Records(logging.Handler):
  """Collects what absl logs (through the 'absl' Python logger), whatever pytest captures."""

  def __init__(self, level=logging.WARNING):
    super().__init__(level)
    self.messages = []

  def emit(self, record):
    self.messages.append(record.getMessage())


@pytest.fixture
def warnings_logged():
  records = _Records()
  logger = logging.getLogger('absl')
  logger.addHandler(records)
  try:
    yield records.messages
  finally:
    logger.removeHandler(records)


# --- metrics.jsonl after a crash ---------------------------------------------------------------------------------


def row(step: int) -> bytes:
  return (json.dumps({'step': step, 'loss': 1.0 / step, 'lr': 1e-3}) + '\n').encode()


def resume(workdir, step: int) -> None:
  metrics.MetricsWriter(str(workdir), tensorboard=False, resume_step=step).close()


def read_bytes(workdir) -> bytes:
  with open(os.path.join(workdir, 'metrics.jsonl'), 'rb') as f:
    return f.read()


def write_file(workdir, content: bytes) -> str:
  path = os.path.join(workdir, 'metrics.jsonl')
  with open(path, 'wb') as f:
    f.write(content)
  return path


def test_truncated_last_line_is_dropped_with_a_warning(tmp_path, warnings_logged):
  cut = row(5)[:17]  # b'{"step": 5, "loss': a write cut off mid-record
  path = write_file(tmp_path, b''.join(row(s) for s in range(1, 5)) + cut)
  resume(tmp_path, 4)
  assert read_bytes(tmp_path) == b''.join(row(s) for s in range(1, 5))
  assert len(warnings_logged) == 1
  assert path in warnings_logged[0] and 'truncated last line' in warnings_logged[0]
  assert 'line 5' in warnings_logged[0] and '"los' in warnings_logged[0]

  # The resumed run's records follow on their own lines.
  writer = metrics.MetricsWriter(str(tmp_path), tensorboard=False, resume_step=4)
  writer.write(5, {'loss': np.float32(0.25)})
  writer.close()
  steps = [json.loads(line)['step'] for line in read_bytes(tmp_path).decode().splitlines()]
  assert steps == [1, 2, 3, 4, 5]


def test_truncated_line_and_later_steps_both_go(tmp_path, warnings_logged):
  write_file(tmp_path, b''.join(row(s) for s in range(1, 7)) + row(7)[:-3])
  resume(tmp_path, 3)
  assert read_bytes(tmp_path) == b''.join(row(s) for s in range(1, 4))
  assert len(warnings_logged) == 1 and 'truncated last line' in warnings_logged[0]


def test_zero_filled_tail_after_power_loss_is_dropped(tmp_path, warnings_logged):
  write_file(tmp_path, row(1) + row(2) + b'\x00' * 64)
  resume(tmp_path, 2)
  assert read_bytes(tmp_path) == row(1) + row(2)
  assert len(warnings_logged) == 1 and '64 bytes' in warnings_logged[0]


def test_unreadable_middle_lines_are_dropped_and_the_rest_kept(tmp_path, warnings_logged):
  bad = [b'{"step": 2, "loss": \xff\xfe}\n', b'[1, 2]\n', b'{"loss": 0.5}\n', b'{"step": "3"}\n']
  write_file(tmp_path, row(1) + b''.join(bad) + row(2) + b'\n' + row(3))
  resume(tmp_path, 10)
  assert read_bytes(tmp_path) == row(1) + row(2) + row(3)
  assert len(warnings_logged) == len(bad)
  assert all('unreadable line' in w for w in warnings_logged)
  assert [f'line {i}' in w for i, w in zip(range(2, 6), warnings_logged)] == [True] * 4


def test_complete_last_record_without_newline_is_kept(tmp_path, warnings_logged):
  write_file(tmp_path, row(1) + row(2)[:-1])  # cut between the record and its newline
  writer = metrics.MetricsWriter(str(tmp_path), tensorboard=False, resume_step=2)
  writer.write(3, {'loss': 0.1})
  writer.close()
  assert [json.loads(line)['step'] for line in read_bytes(tmp_path).splitlines()] == [1, 2, 3]
  assert not warnings_logged


def test_intact_file_is_left_untouched(tmp_path, warnings_logged):
  content = b''.join(row(s) for s in range(1, 4))
  path = write_file(tmp_path, content)
  before = os.stat(path).st_mtime_ns
  time.sleep(0.01)
  resume(tmp_path, 3)
  assert read_bytes(tmp_path) == content and os.stat(path).st_mtime_ns == before
  assert not warnings_logged


# --- peak FLOP/s -------------------------------------------------------------------------------------------------


class FakeDevice:

  def __init__(self, device_kind: str, platform: str = 'gpu'):
    self.device_kind, self.platform = device_kind, platform


def fake_devices(kind: str, count: int, platform: str = 'gpu') -> list:
  return [FakeDevice(kind, platform) for _ in range(count)]


@pytest.fixture
def no_measuring(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError(f'measure_matmul_flops called: {args} {kwargs}')
  monkeypatch.setattr(metrics, 'measure_matmul_flops', refuse)


# Published dense bf16 figures per chip, written out here rather than read from the table.
@pytest.mark.parametrize('kind, platform, entry, per_chip', [
    ('NVIDIA H100 PCIe', 'gpu', 'H100 PCIe', 756e12),
    ('NVIDIA H100 80GB HBM3', 'gpu', 'H100', 989e12),
    ('NVIDIA H200', 'gpu', 'H200', 989e12),
    ('NVIDIA GH200 480GB', 'gpu', 'GH200', 989e12),
    ('NVIDIA A100-SXM4-80GB', 'gpu', 'A100', 312e12),
    ('NVIDIA L4', 'gpu', 'L4', 121e12),
    ('TPU v4', 'tpu', 'TPU v4', 275e12),
    ('TPU v5 lite', 'tpu', 'TPU v5 lite', 197e12),
    ('TPU v5p', 'tpu', 'TPU v5p', 459e12),
    ('TPU v5', 'tpu', 'TPU v5', 459e12),
    ('TPU v6 lite', 'tpu', 'TPU v6 lite', 918e12),
])
@pytest.mark.parametrize('table_order', ['as_written', 'reversed'])
def test_table_lookup_takes_the_most_specific_entry(monkeypatch, no_measuring, kind, platform, entry, per_chip,
                                                    table_order):
  if table_order == 'reversed':  # the match must not depend on the order of the entries
    monkeypatch.setattr(metrics, 'PEAK_FLOPS', metrics.PEAK_FLOPS[::-1])
  for count in (1, 4):
    total, source = metrics.peak_flops(fake_devices(kind, count, platform))
    assert total == pytest.approx(count * per_chip, rel=1e-12)
    assert source == f'table ({entry})'


def test_unknown_device_is_measured_in_bf16_per_chip(monkeypatch, warnings_logged):
  calls = []

  def fake_measure(device, n=None, dtype=jnp.float32, **kwargs):
    calls.append((device.device_kind, n, dtype, kwargs))
    return 3e14

  monkeypatch.setattr(metrics, 'measure_matmul_flops', fake_measure)
  # 'L40S' contains 'L4' but is another chip: it must not get the L4's figure.
  total, source = metrics.peak_flops(fake_devices('NVIDIA L40S', 2))
  assert (total, source) == (6e14, 'measured bf16 matmul')
  assert calls == [('NVIDIA L40S', 8192, jnp.bfloat16, {})]
  assert len(warnings_logged) == 1 and 'NVIDIA L40S' in warnings_logged[0]


def test_config_override_wins_and_counts_devices(no_measuring):
  assert metrics.peak_flops(fake_devices('NVIDIA H100 80GB HBM3', 3), 5e12) == (15e12, 'config')
  assert metrics.peak_flops(jax.devices(), 2e11) == (len(jax.devices()) * 2e11, 'config')


def test_cpu_peak_is_one_host_measurement_not_per_device(monkeypatch):
  measured_on = []

  def fake_measure(device, *args, **kwargs):
    measured_on.append(device)
    return 2.5e11

  monkeypatch.setattr(metrics, 'measure_matmul_flops', fake_measure)
  devices = jax.devices()
  assert len(devices) == 8 and devices[0].platform == 'cpu'
  assert metrics.peak_flops(devices) == (2.5e11, 'measured f32 matmul on this host')
  assert measured_on == [devices[0]]


def test_peak_flops_refuses_no_devices():
  with pytest.raises(ValueError, match='no devices'):
    metrics.peak_flops([])


class FakeClock:
  """Returns timestamps such that consecutive (start, end) calls are `durations` apart."""

  def __init__(self, durations):
    self.durations, self.calls, self.now = list(durations), 0, 100.0

  def __call__(self):
    if self.calls % 2:  # an end: advance by the next duration
      self.now += self.durations[self.calls // 2]
    self.calls += 1
    return self.now


def test_measurement_is_best_run_of_best_shape():
  shapes = ((8, 16, 4), (32, 32, 32))
  # Shape (32, 32, 32)'s best run (0.004 s) gives 2 * 32**3 / 0.004 = 1.6e7 FLOP/s; (8, 16, 4)'s best, 0.0001 s,
  # gives 2 * 8 * 16 * 4 / 0.0001 = 1.0e7.
  clock = FakeClock([0.003, 0.0001, 0.002, 0.01, 0.004, 0.005])
  got = metrics.measure_matmul_flops(jax.devices()[0], shapes=shapes, repeats=3, timer=clock)
  assert got == pytest.approx(2 * 32**3 / 0.004, rel=1e-9)
  assert clock.calls == 12  # warm-ups are not timed
  # The other way round, the first shape wins: the best is a max over shapes, not the last one.
  clock = FakeClock([0.003, 0.00001, 0.002, 0.01, 0.004, 0.005])
  got = metrics.measure_matmul_flops(jax.devices()[0], shapes=shapes, repeats=3, timer=clock)
  assert got == pytest.approx(2 * 8 * 16 * 4 / 0.00001, rel=1e-9)
  # n gives one square matmul, as callers passing n=8192 expect.
  clock = FakeClock([0.5, 0.25])
  assert metrics.measure_matmul_flops(n=16, repeats=2, timer=clock) == pytest.approx(2 * 16**3 / 0.25, rel=1e-9)


def test_measurement_stops_at_its_time_budget():
  clock = FakeClock([0.4] * 10)
  metrics.measure_matmul_flops(shapes=((16, 16, 16),), repeats=10, budget_s=1.0, timer=clock)
  assert clock.calls == 2 * 3  # 0.4 + 0.4 + 0.4 >= 1.0
  clock = FakeClock([5.0] * 10)  # one run over the budget: still best of two
  metrics.measure_matmul_flops(shapes=((16, 16, 16),), repeats=10, budget_s=1.0, timer=clock)
  assert clock.calls == 2 * 2


def test_real_cpu_measurement_matches_an_independent_timing():
  n = 256
  device = jax.devices()[0]
  got = metrics.measure_matmul_flops(device, shapes=((n, n, n),), repeats=10)
  x = jax.device_put(np.ones((n, n), np.float32), device)
  matmul = jax.jit(jnp.dot)
  matmul(x, x).block_until_ready()
  best = math.inf
  for _ in range(10):
    start = time.perf_counter()
    matmul(x, x).block_until_ready()
    best = min(best, time.perf_counter() - start)
  independent = 2 * n**3 / best
  # Loose: other processes share this CPU. A wrong formula (n**2) or timing the compile would be off by >30x.
  assert independent / 10 < got < independent * 10, (got, independent)


@pytest.mark.parametrize('kwargs, needle', [
    (dict(n=16, shapes=((16, 16, 16),)), 'not both'),
    (dict(shapes=((16, 0, 16),)), 'positive ints'),
    (dict(shapes=((16, 16),)), 'triples'),
    (dict(shapes=()), 'triples'),
    (dict(n=16, repeats=0), 'repeats'),
    (dict(n=16, budget_s=0), 'budget_s'),
])
def test_measurement_refuses_bad_arguments(kwargs, needle):
  with pytest.raises(ValueError, match=needle):
    metrics.measure_matmul_flops(**kwargs)


# --- throughput in the training loop's rows ----------------------------------------------------------------------


WORDS = ('alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau '
         'upsilon phi chi psi omega').split()


def tiny_config(text_glob: str):
  cfg = config_lib.defaults()
  cfg.model.update(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=16, vocab_size=512)
  cfg.data.update(source='text', path=text_glob, heldout_fraction=0.5, seq_len=16, prefetch=1)
  cfg.train.update(steps=4, batch_size=8, log_every=1, eval_every=0)
  cfg.optim.update(lr=3e-3, schedule='constant', warmup_steps=2)
  cfg.mesh.update(data=-1)
  cfg.checkpoint.update(enabled=False)
  cfg.metrics.update(peak_flops_per_device=0.0, tensorboard=False)  # the measured CPU peak, as a real run
  return cfg


def test_loop_rows_carry_consistent_throughput(tmp_path, monkeypatch):
  rng = np.random.default_rng(0)
  for i in range(12):
    (tmp_path / f'doc{i:02d}.txt').write_text(' '.join(rng.choice(WORDS, size=150)) + '\n')
  # A smaller matmul than the default shapes keeps the test fast; its lower peak only makes mfu < 1 stricter.
  monkeypatch.setattr(metrics, 'measure_matmul_flops',
                      functools.partial(metrics.measure_matmul_flops, shapes=((512, 512, 512),), repeats=5))
  cfg = tiny_config(str(tmp_path / '*.txt'))
  workdir = tmp_path / 'run'
  loop.train(cfg, str(workdir), devices=jax.devices()[:1])  # one device: the rows' sums need no sharding
  with open(workdir / 'metrics.jsonl', encoding='utf-8') as f:
    rows = [json.loads(line) for line in f]
  assert [r['step'] for r in rows] == [1, 2, 3, 4]
  assert 'tokens_per_s' not in rows[0]  # step 1's time is mostly compilation: not timed
  tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
  for r in rows[1:]:
    assert r['tokens_per_s'] > 0 and r['step_time_s'] > 0, r
    assert 0 < r['mfu'] < 1, r
    assert r['tokens_per_s'] * r['step_time_s'] == pytest.approx(tokens_per_step, rel=1e-12), r
