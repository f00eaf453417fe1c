"""Benchmarks that print ratios against a baseline measured in the same run.

  python -m launch.bench --suite=train      # lm_small train step: tokens/s, MFU, vs a plain single-device step
  python -m launch.bench --suite=train --peer=torch   # ... and vs a plain PyTorch step (pip install -e '.[peer]')
  python -m launch.bench --suite=kernels    # Pallas kernels vs their XLA (and cuDNN) baselines
  python -m launch.bench --suite=moe        # moe_tiny: dispatch paths vs the dense twin, exact vs running balance
  python -m launch.bench --suite=noise_scale --config=configs/lm_tiny.py   # step time with / without the estimate
  python -m launch.bench --suite=diagonal   # ARMT: diagonal vs sequential executor vs full attention
  python -m launch.bench --suite=inference  # engine: continuous vs static, prefix sharing, chunked prefill
  python -m launch.bench --suite=serving    # HTTP load test: 1,000 concurrent requests against launch.serve
  python -m launch.bench --suite=speculative --config=configs/lm_tiny.py --workdir=/tmp/target \
      --draft_config=configs/lm_tiny_draft.py --draft_workdir=/tmp/draft   # speculation on vs off
  python -m launch.bench --suite=train --config=configs/lm_1b.py --config.train.batch_size=8   # on a GPU

Rows are printed as a Markdown table, ready for the README's benchmark table.
"""
import functools
import os
import shlex
import sys

import jax
import jax.numpy as jnp
import optax
from absl import app, flags
from ml_collections import config_flags

import configs
from launch import runtime_flags, timing

_SUITE = flags.DEFINE_enum('suite', 'train', ['train', 'kernels', 'moe', 'noise_scale', 'diagonal', 'inference',
                                              'serving', 'speculative', 'all'],
                           'What to benchmark.')
_CONFIG = config_flags.DEFINE_config_file('config', os.path.join(os.path.dirname(configs.__file__), 'lm_small.py'),
                                          'Model config for --suite=train.', lock_config=True)
_MOE_CONFIG = config_flags.DEFINE_config_file('moe_config', os.path.join(os.path.dirname(configs.__file__),
                                                                         'moe_tiny.py'),
                                              'MoE config for --suite=moe.', lock_config=True)
_STEPS = flags.DEFINE_integer('steps', 5, 'Timed steps per train-step variant (after 2 warm-up steps).')
_PEER = flags.DEFINE_enum('peer', 'none', ['none', 'torch'], 'Train: also time a plain PyTorch implementation '
                          "of the same model, optimizer and batch (launch/torch_peer.py; pip install -e '.[peer]').")
_PASSES = flags.DEFINE_integer('passes', 3, 'Inference, speculative: timed passes over the workload per variant.')
_OUT = flags.DEFINE_string('out', '', 'Inference, serving: where the CSV, summary and plot go (default: '
                           'results/<suite>).')
_REQUESTS = flags.DEFINE_integer('requests', 1000, 'Serving: concurrent requests in the load test.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Speculative: the target\'s training run (with --config).')
_DRAFT_CONFIG = config_flags.DEFINE_config_file('draft_config', None, 'Speculative: the draft model\'s config.',
                                                lock_config=True)
_DRAFT_WORKDIR = flags.DEFINE_string('draft_workdir', None, 'Speculative: the draft\'s training run.')
_QUICK = flags.DEFINE_bool('quick', False, 'Kernels: one small shape each (always so on CPU, where Pallas '
                           'runs in interpret mode); diagonal: the small cases only; inference: small workloads.')


def _reference_step(trainer, batch, device):
  """The real step's math written plainly on one device: the same model, loss (CE + z-loss, token-weighted) and
  optimizer (optim.make_optimizer: clipping, lr schedule, decay mask). What it leaves out is printed under the
  table (REFERENCE_OMITS)."""
  from framework import optim  # pylint: disable=g-import-not-at-top
  from framework.mesh import Sharder  # pylint: disable=g-import-not-at-top
  from framework.models.transformer import Transformer  # pylint: disable=g-import-not-at-top
  from framework.train import token_losses  # pylint: disable=g-import-not-at-top
  cfg = trainer.cfg
  model = Transformer(trainer.model_cfg, Sharder(None, ()))
  opt = optim.make_optimizer(cfg.optim, cfg.train.steps)

  def loss_fn(params, b):
    logits, _ = model.apply({'params': params}, b['inputs'], b['positions'], b['segment_ids'])
    losses = token_losses(logits, b['targets'], b['weights'])
    return (losses['ce_sum'] + cfg.train.z_loss * losses['z_sum']) / jnp.maximum(losses['tokens'], 1.0)

  # Donating the state as the real step does, so neither pays for fresh parameter buffers.
  @functools.partial(jax.jit, donate_argnums=(0,))
  def step(state, b):
    params, opt_state = state
    grads = jax.grad(loss_fn)(params, b)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  batch = jax.device_put(jax.device_get(batch), device)
  params = jax.device_put(jax.device_get(trainer.init(jax.random.key(0)).params), device)
  return step, (params, opt.init(params)), batch


REFERENCE_OMITS = ('plain reference: the same model, loss and optimizer on one device, leaving out the mesh '
                   'shardings, the micro-batch scan (train.micro_batches={}) and the step\'s metrics (norms, lr, '
                   'finite check)')


def _import_torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ValueError("--peer=torch needs PyTorch: pip install -e '.[peer]'") from None
  return torch


def _torch_peer_step(trainer, local_batch, state):
  """The PyTorch peer (launch/torch_peer.py) from batchax's initial parameters, as a timing.time_interleaved run."""
  torch = _import_torch()
  from launch import torch_peer  # pylint: disable=g-import-not-at-top
  # XLA's CPU backend spreads over every core this process may use; the peer gets the same.
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  cfg = trainer.cfg
  peer = torch_peer.Peer(trainer.model_cfg, cfg.optim, cfg.train.steps, cfg.train.z_loss)
  torch_peer.load_batchax_params(peer, jax.device_get(state.params))

  def step(p, b):
    p.step(b)
    return p
  return step, peer, torch_peer.to_torch(local_batch)


def train_suite(cfg) -> None:
  from framework import config as config_lib  # pylint: disable=g-import-not-at-top
  from framework import data as data_lib  # pylint: disable=g-import-not-at-top
  from framework import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  from framework.mesh import make_sharder  # pylint: disable=g-import-not-at-top
  from framework.models.transformer import num_params  # pylint: disable=g-import-not-at-top
  from framework.train import Trainer  # pylint: disable=g-import-not-at-top

  if _PEER.value == 'torch':
    if cfg.moe.num_experts:
      raise ValueError('--peer=torch implements the dense model only; use a config with moe.num_experts=0 (or '
                       '--suite=moe for MoE timings)')
    _import_torch()  # fail before minutes of setup, not after
  devices = jax.devices()
  config_lib.validate(cfg, num_devices=len(devices), backend=devices[0].platform)
  train_data, _ = data_lib.load_splits(cfg.data)
  local = data_lib.batch_for_step(train_data, 0, seed=cfg.seed, global_batch=cfg.train.batch_size,
                                  seq_len=cfg.data.seq_len)
  trainer = Trainer(cfg, make_sharder(cfg, devices))
  batch = trainer.device_batch(local)
  state = trainer.init(jax.random.key(0))
  peak, source = metrics_lib.peak_flops(devices, cfg.metrics.peak_flops_per_device)
  tokens = cfg.train.batch_size * cfg.data.seq_len
  flops = trainer.flops_per_token * tokens
  print(f'# train suite: {num_params(state.params) / 1e6:.1f}M params, batch {cfg.train.batch_size} x '
        f'{cfg.data.seq_len} tokens, {flops / 1e12:.3f} TFLOP/step')
  print(f'# {len(devices)} x {devices[0].device_kind}; peak {peak / 1e12:.3f} TFLOP/s ({source})')

  runs = {
      'framework': (lambda s, b: trainer.train_step(s, b)[0], state, batch),
      'reference': _reference_step(trainer, batch, devices[0]),
  }
  if _PEER.value == 'torch':
    runs['torch'] = _torch_peer_step(trainer, local, state)
    torch = _import_torch()
    print(f'# torch peer: PyTorch {torch.__version__}, eager, f32, SDPA attention, {torch.get_num_threads()} '
          'threads')
  times = timing.time_interleaved(runs, _STEPS.value)

  mesh = 'x'.join(f'{k}{v}' for k, v in trainer.sharder.mesh.shape.items() if v > 1) or 'single'
  rows = [('batchax train_step', mesh, times['framework']), ('plain reference', '1 device', times['reference'])]
  if 'torch' in times:
    rows.append(('pytorch eager peer', f'{_import_torch().get_num_threads()} threads', times['torch']))
  peer = ' vs torch |' if 'torch' in times else ''
  print(f'| step | mesh | ms/step | tokens/s | TFLOP/s | MFU | vs reference |{peer}')
  print('|---|---|---|---|---|---|---|' + ('---|' if peer else ''))
  for name, mesh_name, t in rows:
    vs_torch = f' {times["torch"] / t:.2f}x |' if peer else ''
    print(f'| {name} | {mesh_name} | {1e3 * t:.1f} | {tokens / t:,.0f} | {flops / t / 1e12:.4f} | '
          f'{100 * flops / t / peak:.1f}% | {times["reference"] / t:.2f}x |{vs_torch}')
  print(f'# {REFERENCE_OMITS.format(cfg.train.micro_batches)}')
  if peer:
    print(f'# batchax / torch tokens/s: {times["torch"] / times["framework"]:.2f}x (median of {_STEPS.value} '
          'alternating steps each)')


def kernels_suite(quick: bool) -> None:
  from launch import bench_decode, bench_flash, bench_grouped_matmul  # pylint: disable=g-import-not-at-top
  backend = jax.default_backend()
  quick = quick or backend == 'cpu'
  print(f'# kernels suite on {backend} ({jax.devices()[0].device_kind}){"; interpret-mode smoke run" if backend == "cpu" else ""}')
  print('| kernel | case | impl | ms | throughput | baseline | baseline ms | vs baseline |')
  print('|---|---|---|---|---|---|---|---|')
  for module in (bench_flash, bench_decode, bench_grouped_matmul):
    for r in module.run(backend, quick):
      print(f"| {r['kernel']} | {r['case']} | {r['impl']} | {r['time_ms']:.3f} | {r['throughput']:.3f} {r['unit']} | "
            f"{r['baseline']} | {r['baseline_time_ms']:.3f} | {r['vs_baseline']:.2f}x |")


# Suites that time training steps, which get the training host memory policy (runtime_flags --host_memory).
TRAINING_SUITES = ('train', 'moe', 'noise_scale', 'diagonal')


def main(argv):
  del argv
  runtime_flags.exit_on_user_error(runtime_flags.apply, _SUITE.value not in TRAINING_SUITES)
  if _SUITE.value in ('train', 'all'):
    runtime_flags.exit_on_user_error(train_suite, _CONFIG.value)
  if _SUITE.value in ('kernels', 'all'):
    kernels_suite(_QUICK.value)
  if _SUITE.value in ('moe', 'all'):
    from launch import bench_moe  # pylint: disable=g-import-not-at-top
    runtime_flags.exit_on_user_error(bench_moe.run, _MOE_CONFIG.value, _STEPS.value)
  if _SUITE.value in ('noise_scale', 'all'):
    from launch import bench_noise_scale  # pylint: disable=g-import-not-at-top
    runtime_flags.exit_on_user_error(bench_noise_scale.run, _CONFIG.value, _STEPS.value)
  if _SUITE.value in ('diagonal', 'all'):
    from launch import bench_diagonal  # pylint: disable=g-import-not-at-top
    bench_diagonal.run(_STEPS.value, _QUICK.value)
  if _SUITE.value in ('inference', 'all'):
    from launch import bench_inference  # pylint: disable=g-import-not-at-top
    runtime_flags.exit_on_user_error(bench_inference.run, _QUICK.value, _PASSES.value,
                                     _OUT.value or 'results/inference', _command())
  if _SUITE.value in ('serving', 'all'):
    from launch import bench_serving  # pylint: disable=g-import-not-at-top
    runtime_flags.exit_on_user_error(bench_serving.run, _REQUESTS.value, _OUT.value or 'results/serving',
                                     _command(), errors=(bench_serving.LoadError,))
  if _SUITE.value == 'speculative':  # needs a trained pair: not part of 'all'
    runtime_flags.exit_on_user_error(_speculative)


def _speculative() -> None:
  if not (_WORKDIR.value and _DRAFT_CONFIG.value is not None and _DRAFT_WORKDIR.value):
    raise ValueError('--suite=speculative: give --config and --workdir (the target) and --draft_config and '
                     '--draft_workdir (the draft); configs/lm_tiny_draft.py says how to train a pair')
  from framework import config as config_lib  # pylint: disable=g-import-not-at-top
  from framework.inference import speculative  # pylint: disable=g-import-not-at-top
  from launch import bench_speculative  # pylint: disable=g-import-not-at-top
  cfg = _CONFIG.value
  config_lib.validate(cfg, num_devices=jax.device_count(), backend=jax.default_backend())
  draft = speculative.draft_config(cfg, _DRAFT_CONFIG.value, jax.device_count(), jax.default_backend())
  bench_speculative.run(cfg, _WORKDIR.value, draft, _DRAFT_WORKDIR.value, _QUICK.value, _PASSES.value,
                        _OUT.value or 'results/speculative', _command())


def _command() -> str:
  return 'python -m launch.bench ' + ' '.join(shlex.quote(a) for a in sys.argv[1:])


if __name__ == '__main__':
  app.run(main, flags_parser=runtime_flags.parse_flags)
