"""Metrics: WORKDIR/metrics.jsonl and TensorBoard event files, throughput and MFU."""
from __future__ import annotations

import json
import math
import os
import time

import jax
import jax.numpy as jnp
from absl import logging

# Dense bf16 peak FLOP/s per chip, matched against jax.Device.device_kind (most specific first).
PEAK_FLOPS = (
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


def measure_matmul_flops(device: jax.Device | None = None, n: int = 2048, dtype=jnp.float32, repeats: int = 5) -> float:
  """Best achieved FLOP/s of an n x n matmul on `device`: the CPU's practical peak (all cores)."""
  device = device or jax.devices()[0]
  a = jax.device_put(jnp.ones((n, n), dtype), device)
  f = jax.jit(lambda x: x @ x)
  jax.block_until_ready(f(a))
  best = math.inf
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(f(a))
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best


def peak_flops(devices, override_per_device: float = 0.0) -> tuple[float, str]:
  """Total peak FLOP/s of `devices` and where the number came from.

  CPU "devices" faked with --xla_force_host_platform_device_count share one host's cores, so the CPU peak is
  one measured matmul for the whole host, not a per-device figure times the device count.
  """
  if override_per_device:
    return override_per_device * len(devices), 'config'
  kind = devices[0].device_kind
  if devices[0].platform == 'cpu':
    return measure_matmul_flops(devices[0]), 'measured f32 matmul on this host'
  for name, flops in PEAK_FLOPS:
    if name in kind:
      return flops * len(devices), f'table ({name})'
  logging.warning('No peak FLOP/s known for %r; measuring a bf16 matmul instead', kind)
  return measure_matmul_flops(devices[0], n=8192, dtype=jnp.bfloat16) * len(devices), 'measured bf16 matmul'


class MetricsWriter:
  """Appends one JSON object per logged step to WORKDIR/metrics.jsonl and mirrors scalars to TensorBoard.

  Only process 0 writes. Appending (not truncating) keeps the history of a resumed run in one file.
  """

  def __init__(self, workdir: str, tensorboard: bool = True, resume_step: int = 0):
    self.active = jax.process_index() == 0
    self._tb = None
    if not self.active:
      return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, 'metrics.jsonl')
    _drop_records_after(path, resume_step)
    self._jsonl = open(path, 'a', encoding='utf-8')
    if tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, values: dict) -> None:
    if not self.active:
      return
    clean = {k: _plain(v) for k, v in values.items()}
    self._jsonl.write(json.dumps({'step': int(step), **clean}) + '\n')
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


def _drop_records_after(path: str, step: int) -> None:
  """A run that crashed after logging step k but before checkpointing it redoes those steps on resume: drop the
  stale records so each step appears once."""
  if not os.path.exists(path):
    return
  with open(path, encoding='utf-8') as f:
    lines = f.readlines()
  kept = [line for line in lines if line.strip() and json.loads(line).get('step', 0) <= step]
  if len(kept) != len(lines):
    tmp = path + '.tmp'
    with open(tmp, 'w', encoding='utf-8') as f:
      f.writelines(kept)
    os.replace(tmp, path)


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
