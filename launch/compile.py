"""Compile the train step for a TPU slice ahead of time, from any host, and say whether it fits in HBM.

  pip install -e '.[tpu]'   # libtpu
  python -m launch.compile --config=configs/lm_1b.py --topology=v5e:2x4 [--config.mesh.fsdp=4 ...]

Prints per-device memory (arguments, outputs, temporaries, total vs the chip's HBM) and FLOPs per step; exits
with one line naming the fix when the step will not fit.
"""
from absl import app, flags
from ml_collections import config_flags

from launch import memory_report
from launch import runtime_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (get_config(arg) -> ConfigDict).',
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string('topology', None, 'TPU topology to compile for, e.g. v5e:2x4 or v5p:2x2x1.')
flags.mark_flags_as_required(['config', 'topology'])


def _report(cfg, topology: str) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  # The host only traces; keeping jax off libtpu's chip client avoids probing for TPUs that are not here.
  jax.config.update('jax_platforms', 'cpu')
  from launch import aot  # pylint: disable=g-import-not-at-top
  devices = aot.topology_devices(topology)
  kind = devices[0].device_kind
  step = aot.compile_train_step(cfg, devices)
  mesh = ' '.join(f'{a}={n}' for a, n in step.mesh_sizes.items())
  print(f'{topology}: {len(devices)} x {kind}, mesh {mesh}, attention {step.attention_impl}, '
        f'batch {cfg.train.batch_size} x {cfg.data.seq_len} in {cfg.train.micro_batches} micro-batch(es)')
  print('per-device memory:')
  print(memory_report.format_table(step.memory))
  # XLA's cost analysis counts a while-loop body once, so the n_layers iterations of the layer scan count as
  # one; the model's own count is the one to plan with, XLA's is printed so the two can be compared.
  print(f'FLOPs per step: {step.model_flops:.4g} (model: 6 x matmul params x tokens + attention), '
        f'{step.model_flops / len(devices):.4g} per device; XLA cost analysis {step.flops_per_device:.4g} per '
        'device (counts the layer scan body once and Pallas kernels as 0)')
  if not step.memory.fits:
    raise memory_report.DoesNotFit(memory_report.refusal(step.memory, f'{topology} ({kind})'))
  print('fits')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  runtime_flags.exit_on_user_error(_report, _CONFIG.value, _TOPOLOGY.value, errors=(memory_report.DoesNotFit,))


if __name__ == '__main__':
  app.run(main, flags_parser=runtime_flags.parse_flags)
