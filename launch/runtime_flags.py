"""Flags that set up the runtime before jax starts (fake CPU devices, multi-process jobs), and the launchers'
rule for errors a user can cause: one line on stderr, not a traceback."""
import logging as py_logging
import re
import sys

import jax
from absl import flags, logging

# What a user's input can raise: bad config or flags (ValueError), paths (OSError), and whatever else a
# launcher adds (e.g. framework.loop.NonFiniteLossError).
USER_ERRORS = (ValueError, OSError)

CPU_DEVICES = flags.DEFINE_integer(
    'cpu_devices', 0, 'Run on N fake CPU devices (jax_num_cpu_devices) instead of the default backend; 0: off.')
COORDINATOR = flags.DEFINE_string('coordinator_address', '', 'host:port of process 0 for a multi-process job.')
NUM_PROCESSES = flags.DEFINE_integer('num_processes', 0, 'Processes in the job (with --coordinator_address).')
PROCESS_ID = flags.DEFINE_integer('process_id', -1, 'This process (with --coordinator_address).')
DISTRIBUTED_AUTO = flags.DEFINE_bool('distributed_auto', False,
                                     'Join a multi-process job described by the environment (TPU pod, SLURM).')
DISTRIBUTED_TIMEOUT = flags.DEFINE_integer('distributed_timeout', 300, 'Seconds to wait for every process.')
HOST_MEMORY = flags.DEFINE_enum(
    'host_memory', 'auto', ['auto', 'keep', 'system'],
    'Host allocator policy (framework/host_memory.py). keep: one glibc arena that reuses freed memory (no page '
    'faults for XLA:CPU\'s per-step temporaries; training 3.7 -> 3.2 s/step on lm_small); system: glibc defaults '
    '(faster for serving); auto: keep for training, system for serving.')
HEARTBEAT_TIMEOUT = flags.DEFINE_integer('distributed_heartbeat_timeout', 100, 'A process silent this many seconds '
                                         '(killed, its host lost) stops the whole job with an error.')


def apply(serving: bool = False) -> None:
  """Call first in main(), before anything touches a device. serving: the launcher runs the inference engine (the
  host memory policy's 'auto' choice)."""
  if CPU_DEVICES.value < 0:
    raise ValueError(f'--cpu_devices must be >= 0, got {CPU_DEVICES.value}')
  if HOST_MEMORY.value == 'keep' or (HOST_MEMORY.value == 'auto' and not serving):
    from framework import host_memory  # pylint: disable=g-import-not-at-top
    host_memory.keep_freed_memory()  # before jax's CPU client starts its threads
  if CPU_DEVICES.value:
    jax.config.update('jax_platforms', 'cpu')
    jax.config.update('jax_num_cpu_devices', CPU_DEVICES.value)
  from framework import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize(coordinator_address=COORDINATOR.value, num_processes=NUM_PROCESSES.value,
                         process_id=PROCESS_ID.value, auto=DISTRIBUTED_AUTO.value,
                         timeout_s=DISTRIBUTED_TIMEOUT.value, heartbeat_timeout_s=HEARTBEAT_TIMEOUT.value)


def only_our_info(record) -> bool:
  """A log filter: Orbax and jax log every checkpoint phase at INFO; keep INFO lines from batchax, warnings from
  everyone. Launchers add it to absl's handler."""
  return record.levelno >= py_logging.WARNING or '/framework/' in record.pathname or '/launch/' in record.pathname


def exit_on_user_error(fn, *args, errors: tuple = (), **kwargs):
  """Runs fn; an error from USER_ERRORS + `errors` exits with one line `error: ...` (the traceback goes to the
  log at verbosity 1, for bug reports)."""
  try:
    return fn(*args, **kwargs)
  except USER_ERRORS + tuple(errors) as e:
    logging.vlog(1, 'traceback of the error below', exc_info=True)
    sys.exit(f'error: {" ".join(str(e).splitlines())}')


def main_of(run, serving: bool = False):
  """A launcher's absl main(): no stray arguments, other libraries' INFO lines quiet, the runtime set up (serving:
  as for apply), then `run()`, with one line on stderr for any error a user can cause. Use as
  app.run(main_of(run), ...)."""
  def main(argv):
    if len(argv) > 1:
      from absl import app  # pylint: disable=g-import-not-at-top
      raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    logging.get_absl_handler().python_handler.addFilter(only_our_info)
    exit_on_user_error(apply, serving)
    exit_on_user_error(run)
  return main


def parse_flags(argv):
  """absl flag parsing that turns a bad --config.* override (unknown key, wrong type) into one line, not a
  traceback. Pass as app.run(main, flags_parser=parse_flags)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f'error: {e}\nPass --help for usage.')
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    sys.exit(f'error: bad --config override: {_one_line(e)}')


def _one_line(error: Exception) -> str:
  """ml_collections nests a KeyError's repr inside an AttributeError; unwrap it to one readable line."""
  text = re.sub(r"[\\'\"]+", "'", str(error).replace('\\n', ' ')).strip("'")
  key, _, rest = text.partition("'")
  return f'unknown key {key!r};{rest}' if isinstance(error, AttributeError) and rest else text
