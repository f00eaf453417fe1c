"""`launch.bench --suite=moe`: moe_tiny's train step on each dispatch path against the dense model with the same
active feed-forward parameters, and what the exact global balance costs over the running form, in one run.

Variants (all from the same config, data and initial seed, stepped in alternation by launch.timing.time_interleaved):
  dense twin        moe.num_experts=0 and model.d_ff = top_k x d_ff_expert: the same active parameters per token
  dropless/blocked  sorted tokens, each expert's rows padded to whole blocks, one batched matmul (XLA)
  dropless/ragged   jax.lax.ragged_dot (on XLA:CPU every expert on every row: num_experts times the work)
  dropless/pallas   pallas_kernels.grouped_matmul (GPU/TPU only: on CPU the Pallas interpreter is not a timing)
  capacity          per-sequence expert slots (moe.capacity_factor), dropped choices counted
  global, running / exact   with train.micro_batches=4: the balance f carried over micro-batches vs a
                    forward-only routing pass first (moe.balance_exact)
"""
from __future__ import annotations

import jax

MICRO = 4


def _variants(base, backend: str) -> dict:
  def make(**changes):
    cfg = base.copy_and_resolve_references()
    for key, value in changes.items():
      section, field = key.split('.')
      cfg[section][field] = value
    return cfg

  m = base.moe
  variants = {
      'dense twin (same active params)': make(**{'moe.num_experts': 0, 'model.d_ff': m.top_k * m.d_ff_expert}),
      'dropless, blocked': make(**{'moe.gmm_impl': 'blocked'}),
      'dropless, ragged_dot': make(**{'moe.gmm_impl': 'ragged_dot'}),
      'capacity (factor 1.25)': make(**{'moe.dispatch': 'capacity', 'moe.capacity_factor': 1.25}),
      f'global balance, running ({MICRO} micro-batches)': make(**{'train.micro_batches': MICRO}),
      f'global balance, exact ({MICRO} micro-batches)': make(**{'train.micro_batches': MICRO,
                                                                  'moe.balance_exact': True}),
  }
  if backend != 'cpu':
    variants['dropless, pallas'] = make(**{'moe.gmm_impl': 'pallas'})
  return variants


def run(base, steps: int) -> None:
  from framework import config as config_lib  # pylint: disable=g-import-not-at-top
  from framework import data as data_lib  # pylint: disable=g-import-not-at-top
  from framework.mesh import make_sharder  # pylint: disable=g-import-not-at-top
  from framework.train import Trainer  # pylint: disable=g-import-not-at-top
  from launch.timing import time_interleaved  # pylint: disable=g-import-not-at-top

  if not base.moe.num_experts:
    raise ValueError('--suite=moe needs an MoE config (moe.num_experts > 0), e.g. --moe_config=configs/moe_tiny.py')
  devices = jax.devices()
  backend = devices[0].platform
  variants = _variants(base, backend)
  train_data, _ = data_lib.load_splits(base.data)
  local = data_lib.batch_for_step(train_data, 0, seed=base.seed, global_batch=base.train.batch_size,
                                  seq_len=base.data.seq_len)
  runs, flops = {}, {}
  for name, cfg in variants.items():
    config_lib.validate(cfg, num_devices=len(devices), backend=backend)
    trainer = Trainer(cfg, make_sharder(cfg, devices))
    runs[name] = (lambda s, b, t=trainer: t.train_step(s, b)[0], trainer.init(jax.random.key(0)),
                  trainer.device_batch(local))
    flops[name] = trainer.flops_per_token
  tokens = base.train.batch_size * base.data.seq_len
  print(f'# moe suite: {base.moe.num_experts} experts, top-{base.moe.top_k}, batch {base.train.batch_size} x '
        f'{base.data.seq_len} tokens; {len(devices)} x {devices[0].device_kind}')
  if backend == 'cpu':
    print('# dropless, pallas: not timed on CPU (the Pallas interpreter is a correctness tool, not a kernel)')
  times = time_interleaved(runs, steps)
  dense = times['dense twin (same active params)']
  print('| variant | ms/step | tokens/s | model TFLOP/s | vs dense twin |')
  print('|---|---|---|---|---|')
  for name, t in times.items():
    print(f'| {name} | {1e3 * t:.1f} | {tokens / t:,.0f} | {flops[name] * tokens / t / 1e12:.4f} | '
          f'{dense / t:.2f}x |')
  running = times[f'global balance, running ({MICRO} micro-batches)']
  exact = times[f'global balance, exact ({MICRO} micro-batches)']
  print(f'# exact global balance costs {exact / running:.2f}x the running form\'s step time (median of {steps} '
        'alternating steps each)')
