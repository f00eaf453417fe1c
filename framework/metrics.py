"""Metrics: WORKDIR/metrics.jsonl and TensorBoard event files, throughput and MFU."""
from __future__ import annotations

import json
import math
import re
import time

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from framework import storage
from framework.config_checks import Context, non_negative

# Dense bf16 peak FLOP/s per chip. An entry matches a jax.Device.device_kind that contains its name as whole
# words ('L4' is not 'NVIDIA L40S'); the longest matching name wins ('TPU v5 lite' over 'TPU v5').
PEAK_FLOPS = (
    ('GH200', 989e12),
    ('H200', 989e12),
    ('H100 PCIe', 756e12),
    ('H100', 989e12),
    ('A100', 312e12),
    ('L4', 121e12),
    ('TPU v6 lite', 918e12),
    ('TPU v5 lite', 197e12),
    ('TPU v5p', 459e12),
    ('TPU v5', 459e12),
    ('TPU v4', 275e12),
)


# (m, k, n) of the matmuls whose best FLOP/s is the CPU peak: two squares, and lm_small's MLP projection
# (16 x 256 tokens, d_model 512, d_ff 2048). One square timed five times let a slow moment or an unlucky shape set
# the peak: the README's lm_small MFU was taken against 0.105 TFLOP/s on a host that measures 0.19-0.21.
CPU_MATMUL_SHAPES = ((1024, 1024, 1024), (2048, 2048, 2048), (4096, 512, 2048))


def measure_matmul_flops(device: jax.Device | None = None, n: int | None = None, dtype=jnp.float32,
                         repeats: int = 10, *, shapes=None, budget_s: float = 0.5, timer=time.perf_counter) -> float:
  """Best achieved FLOP/s, 2*m*k*n / fastest run, over matmuls on `device`: the CPU's practical peak (all cores).

  Each shape is compiled and run once untimed, then timed `repeats` times, stopping early once its timed runs add
  up to `budget_s` (after at least two): the default shapes take ~1.5 s on a 2-core CPU doing 0.2 TFLOP/s, more
  on a slower or busy one (5-6 s on one shared with three other test runs, at 0.02 TFLOP/s).

  Args:
    device: where to run; default the first device.
    n: measure only an n x n @ n x n matmul; default `shapes`.
    dtype: of the operands.
    repeats: timed runs per shape (at most).
    shapes: (m, k, n) triples, an (m, k) @ (k, n) matmul each; default CPU_MATMUL_SHAPES.
    budget_s: seconds of timed runs per shape after which it stops.
    timer: seconds clock, called right before and right after each timed run.
  """
  if n is not None and shapes is not None:
    raise ValueError('measure_matmul_flops: pass n (one square matmul) or shapes, not both')
  shapes = ((n, n, n),) if n is not None else (CPU_MATMUL_SHAPES if shapes is None else shapes)
  if not shapes or not all(len(s) == 3 and all(isinstance(d, int) and d > 0 for d in s) for s in shapes):
    raise ValueError(f'measure_matmul_flops: shapes must be (m, k, n) triples of positive ints, got {shapes!r}')
  if not isinstance(repeats, int) or repeats < 1:
    raise ValueError(f'measure_matmul_flops: repeats must be an int >= 1, got {repeats!r}')
  if not budget_s > 0:
    raise ValueError(f'measure_matmul_flops: budget_s must be > 0, got {budget_s!r}')
  device = device or jax.devices()[0]
  f = jax.jit(lambda x, y: x @ y)
  best = 0.0
  for m, k, n_ in shapes:
    x = jax.device_put(jnp.ones((m, k), dtype), device)
    y = jax.device_put(jnp.ones((k, n_), dtype), device)
    jax.block_until_ready(f(x, y))  # compiles, and warms caches and the thread pool
    fastest, spent = math.inf, 0.0
    for i in range(repeats):
      start = timer()
      jax.block_until_ready(f(x, y))
      elapsed = timer() - start
      fastest, spent = min(fastest, elapsed), spent + elapsed
      if spent >= budget_s and i >= 1:
        break
    if fastest <= 0:
      raise RuntimeError(f'measure_matmul_flops: a {m}x{k}x{n_} matmul timed at {fastest} s; the timer is broken')
    best = max(best, 2 * m * k * n_ / fastest)
  return best


def table_peak_flops(device_kind: str) -> tuple[str, float] | None:
  """(entry name, per-chip peak) of the PEAK_FLOPS entry for `device_kind`, or None if none matches."""
  matches = [(name, flops) for name, flops in PEAK_FLOPS
             if re.search(rf'(?<![0-9A-Za-z]){re.escape(name)}(?![0-9A-Za-z])', device_kind)]
  return max(matches, key=lambda m: len(m[0]), default=None)


def peak_flops(devices, override_per_device: float = 0.0) -> tuple[float, str]:
  """Total peak FLOP/s of `devices` and where the number came from.

  CPU "devices" faked with --xla_force_host_platform_device_count share one host's cores, so the CPU peak is
  one measured matmul for the whole host, not a per-device figure times the device count.
  """
  if not devices:
    raise ValueError('peak_flops: no devices given')
  if override_per_device:
    return override_per_device * len(devices), 'config'
  kind = devices[0].device_kind
  if devices[0].platform == 'cpu':
    return measure_matmul_flops(devices[0]), 'measured f32 matmul on this host'
  entry = table_peak_flops(kind)
  if entry is not None:
    return entry[1] * len(devices), f'table ({entry[0]})'
  logging.warning('No peak FLOP/s known for %r; measuring a bf16 matmul instead', kind)
  return measure_matmul_flops(devices[0], n=8192, dtype=jnp.bfloat16) * len(devices), 'measured bf16 matmul'


class MetricsWriter:
  """Appends one JSON object per logged step to WORKDIR/metrics.jsonl and mirrors scalars to TensorBoard under
  WORKDIR/tensorboard; WORKDIR may be remote (framework/storage.py).

  Only process 0 writes. Appending (not truncating) keeps the history of a resumed run in one file.
  """

  def __init__(self, workdir, tensorboard: bool = True, resume_step: int = 0):
    self.active = jax.process_index() == 0
    self._tb = None
    if not self.active:
      return
    root = storage.workdir_path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    path = root / 'metrics.jsonl'
    _drop_records_after(path, resume_step)
    self._jsonl = storage.AppendFile(path)
    if tensorboard:
      self._tb = storage.tensorboard_writer(root / 'tensorboard')

  def write(self, step: int, values: dict) -> None:
    if not self.active:
      return
    clean = {k: _plain(v) for k, v in values.items()}
    self._jsonl.write((json.dumps({'step': int(step), **clean}) + '\n').encode('utf-8'))
    self._jsonl.flush()
    if self._tb is not None:
      for key, value in clean.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
          self._tb.add_scalar(key, value, step)
      self._tb.flush()

  def close(self) -> None:
    if self.active:
      self._jsonl.close()
      if self._tb is not None:
        self._tb.close()


def read_records(workdir) -> list[dict]:
  """The records of WORKDIR/metrics.jsonl (local or remote), in order, skipping any line a crash left
  unreadable."""
  lines = (storage.workdir_path(workdir) / 'metrics.jsonl').read_bytes().split(b'\n')
  return [r for r in (_parse_record(line) for line in lines if line.strip()) if r is not None]


def _drop_records_after(path, step: int) -> None:
  """A run that crashed after logging step k but before checkpointing it redoes those steps on resume: drop the
  stale records so each step appears once.

  A crash mid-write can also leave a line cut short (or, after a power loss, zero bytes). Such lines, and any
  other line that is not a JSON object with an int "step", are dropped with a warning naming the line, never
  failing the resume: they hold no record a reader could use, and a cut last line would otherwise run into the
  next record appended after it.
  """
  if not path.exists():
    return
  raw = path.read_bytes()
  lines = raw.split(b'\n')
  last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
  kept, later = [], 0
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    record = _parse_record(line)
    if record is None:
      preview = line[:120].decode('utf-8', errors='replace')
      what = 'a truncated last line (cut off by a crash?)' if i == last else 'an unreadable line'
      logging.warning('%s: dropped %s, line %d of %d bytes: %r', path, what, i + 1, len(line), preview)
    elif record['step'] <= step:
      kept.append(line + b'\n')
    else:
      later += 1
  if later:
    logging.info('%s: dropped %d records after step %d, the step this run resumes from', path, later, step)
  content = b''.join(kept)
  if content != raw:
    storage.write_bytes_atomic(path, content)


def _parse_record(line: bytes) -> dict | None:
  """The record on one metrics.jsonl line, or None if it is not a JSON object with an int 'step'."""
  try:
    record = json.loads(line.decode('utf-8'))
  except ValueError:  # UnicodeDecodeError is a ValueError too
    return None
  if not isinstance(record, dict) or not isinstance(record.get('step'), int) or isinstance(record['step'], bool):
    return None
  return record


def _plain(value):
  """JSON-able Python value from a numpy / jax scalar or small array."""
  if hasattr(value, 'tolist'):
    value = value.tolist()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s'


# --- the `metrics` config section --------------------------------------------------------------------------------


def defaults() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      tensorboard=True,
      peak_flops_per_device=0.0,  # 0: look up the device, or measure a matmul on CPU
  ))


def validate(cfg, ctx: Context) -> None:
  del ctx
  non_negative(cfg.metrics, 'metrics', 'peak_flops_per_device')
