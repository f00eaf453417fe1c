"""`launch.bench --suite=noise_scale`: the train step with and without the gradient-noise-scale terms, same run.

Both variants are --config's model with train.micro_batches=4 (the estimate compares micro-batch gradients with
the step's); the estimate adds one squared gradient norm per micro-batch inside the step and a few float
operations on the host per step (framework/noise_scale.py), which the host side's figure below includes. On a
mesh that splits the batch over 2 or more devices (e.g. --cpu_devices=8) the run also times one micro-batch with
and without the per-shard estimate (each shard's gradient against their mean, train.py `_per_shard_grads`).
"""
from __future__ import annotations

import time

import jax

MICRO = 4


def run(base, steps: int) -> None:
  from framework import config as config_lib  # pylint: disable=g-import-not-at-top
  from framework import data as data_lib  # pylint: disable=g-import-not-at-top
  from framework import noise_scale  # pylint: disable=g-import-not-at-top
  from framework.mesh import make_sharder, shard_count  # pylint: disable=g-import-not-at-top
  from framework.train import Trainer  # pylint: disable=g-import-not-at-top
  from launch.timing import time_interleaved  # pylint: disable=g-import-not-at-top

  devices = jax.devices()
  train_data, _ = data_lib.load_splits(base.data)
  local = data_lib.batch_for_step(train_data, 0, seed=base.seed, global_batch=base.train.batch_size,
                                  seq_len=base.data.seq_len)
  runs, trainers = {}, {}
  variants = [('without the estimate', MICRO, False), ('with the estimate', MICRO, True)]
  if shard_count(tuple(base.mesh.axis_rules), config_lib.validate(base, num_devices=len(devices)), 'batch')[0] > 1:
    variants += [('1 micro-batch, without', 1, False), ('1 micro-batch, per-shard estimate', 1, True)]
  estimated = {name: enabled for name, _, enabled in variants}
  for name, micro, enabled in variants:
    cfg = base.copy_and_resolve_references()
    cfg.train.micro_batches = micro
    cfg.noise_scale.enabled = enabled
    config_lib.validate(cfg, num_devices=len(devices), backend=devices[0].platform)
    trainer = Trainer(cfg, make_sharder(cfg, devices))
    trainers[name] = trainer
    runs[name] = (lambda s, b, t=trainer: t.train_step(s, b)[0], trainer.init(jax.random.key(0)),
                  trainer.device_batch(local))
  times = time_interleaved(runs, steps)
  # The host side, timed on a real step's metrics.
  _, metrics = trainers['with the estimate'].train_step(trainers['with the estimate'].init(jax.random.key(0)),
                                                         trainers['with the estimate'].device_batch(local))
  metrics = jax.device_get(metrics)
  ns = noise_scale.NoiseScale(0.95)
  start = time.perf_counter()
  for step in range(1000):
    ns.observe(step, metrics)
  host = (time.perf_counter() - start) / 1000
  base_t = times['without the estimate']
  print(f'# noise_scale suite: batch {base.train.batch_size} x {base.data.seq_len} tokens in {MICRO} micro-batches; '
        f'{len(devices)} x {devices[0].device_kind}')
  print('| variant | ms/step | vs the same micro-batches without |')
  print('|---|---|---|')
  for name, t in times.items():
    extra = host if estimated[name] else 0.0
    against = times['1 micro-batch, without'] if name.startswith('1 micro') else base_t
    print(f'| {name} | {1e3 * (t + extra):.1f} | {(t + extra) / against:.3f}x |')
  print(f'# host side per step: {1e6 * host:.1f} us (included above); median of {steps} alternating steps each')
