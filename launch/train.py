"""Train a language model from a config file.

  python -m launch.train --config=configs/lm_tiny.py --workdir=/tmp/run \
      [--config.train.steps=50 --config.mesh.fsdp=2 ...] [--cpu_devices=8]

Rerunning the same command resumes from the latest complete checkpoint in WORKDIR/checkpoints.
"""
from absl import app, flags, logging
from ml_collections import config_flags

from launch import runtime_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (get_config(arg) -> ConfigDict).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics.jsonl and TensorBoard.')
_ALLOW_DATA_CHANGE = flags.DEFINE_bool(
    'allow_data_change', False, 'Resume even though the data stream (files, seq_len, seed, ...) differs from the '
    "checkpoint's; the data position then points into the new stream. Logged as a warning.")
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().python_handler.addFilter(runtime_flags.only_our_info)
  runtime_flags.exit_on_user_error(runtime_flags.apply)
  from framework import loop  # pylint: disable=g-import-not-at-top  (after the device flags take effect)
  summary = runtime_flags.exit_on_user_error(loop.train, _CONFIG.value, _WORKDIR.value,
                                             allow_data_change=_ALLOW_DATA_CHANGE.value,
                                             errors=(loop.NonFiniteLossError,))
  logging.info('Done: %s', {k: round(float(v), 4) for k, v in summary.items() if k in ('step', 'loss', 'eval_loss')})


if __name__ == '__main__':
  app.run(main, flags_parser=runtime_flags.parse_flags)
