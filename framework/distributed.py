"""Multi-process start-up: jax.distributed.initialize from explicit settings or the cluster's environment.

Every process of a multi-host job calls `initialize` before touching a device. A peer that never arrives makes
jax abort after `timeout_s`, so jobs fail loudly instead of hanging.
"""
from __future__ import annotations

import logging as py_logging
import sys
import threading

import jax
from absl import logging


def initialize(*, coordinator_address: str = '', num_processes: int = 0, process_id: int = -1,
               auto: bool = False, timeout_s: int = 300, heartbeat_timeout_s: int = 100) -> None:
  """Joins a multi-process job; does nothing for a single process.

  Args:
    coordinator_address: 'host:port' of process 0; with num_processes and process_id, an explicit job.
    num_processes: processes in the job (>= 2 for an explicit job).
    process_id: this process, in [0, num_processes).
    auto: let jax read the cluster's environment (TPU pods, SLURM, Open MPI, ...).
    timeout_s: how long to wait for every peer.
    heartbeat_timeout_s: a peer silent this long (killed, its host gone) makes every process stop with an error.
  """
  explicit = bool(coordinator_address)
  if explicit and auto:
    raise ValueError('--distributed_auto and --coordinator_address exclude each other; give one')
  if explicit:
    if num_processes < 2:
      raise ValueError(f'--num_processes must be >= 2 with --coordinator_address, got {num_processes}')
    if not 0 <= process_id < num_processes:
      raise ValueError(f'--process_id must be in [0, {num_processes}), got {process_id}')
    if ':' not in coordinator_address:
      raise ValueError(f'--coordinator_address must be host:port, got {coordinator_address!r}')
  elif num_processes or process_id >= 0:
    raise ValueError('--num_processes and --process_id need --coordinator_address')
  if not (explicit or auto):
    return
  # CPU collectives across processes need an explicit transport; GPU and TPU ignore this setting.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  where = coordinator_address or 'the coordinator the cluster environment names'
  # jax aborts the process (no Python exception) when the peers do not all arrive in time; say why first.
  watchdog = threading.Timer(max(timeout_s - 0.5, 0.1), _say_peers_missing,
                             (where, num_processes, process_id, timeout_s))
  watchdog.daemon = True
  watchdog.start()
  try:
    if explicit:
      jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id,
                                 initialization_timeout=timeout_s, heartbeat_timeout_seconds=heartbeat_timeout_s)
    else:
      jax.distributed.initialize(initialization_timeout=timeout_s, heartbeat_timeout_seconds=heartbeat_timeout_s)
  finally:
    watchdog.cancel()
  # On absl's logger (not its handler): the prefix then holds whether or not absl's handler is installed.
  py_logging.getLogger('absl').addFilter(_ProcessPrefix(jax.process_index(), jax.process_count()))
  logging.info('Process %d of %d; %d local / %d global devices', jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())


def _say_peers_missing(where: str, num_processes: int, process_id: int, timeout_s: int) -> None:
  who = f'process {process_id} of {num_processes}' if num_processes else 'this process'
  sys.stderr.write(f'error: {who}: not every process of the job joined {where} within {timeout_s} s '
                   '(--distributed_timeout); start all of them with the same --coordinator_address and '
                   '--num_processes (or check the cluster environment), or raise the timeout\n')
  sys.stderr.flush()


class _ProcessPrefix(py_logging.Filter):
  """Prefixes every log line of a multi-process job with its process, so interleaved logs stay readable."""

  def __init__(self, index: int, count: int):
    super().__init__()
    self.prefix = f'[process {index}/{count}] '

  def filter(self, record) -> bool:
    if not str(record.msg).startswith(self.prefix):
      record.msg = self.prefix + str(record.msg)
    return True
