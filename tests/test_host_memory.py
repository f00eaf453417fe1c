"""The host allocator policy of framework/host_memory.py, as the launchers set it (launch/runtime_flags.py
--host_memory): a large block freed on a worker thread is reused, not unmapped and faulted in again. Each case runs
in a fresh interpreter, since the policy is per process."""
import subprocess
import sys

import pytest

from framework import host_memory

# A worker thread (as XLA:CPU's are) mallocs, touches and frees 256 MiB twice; prints the minor page faults of the
# second round. Under glibc's defaults the block is a fresh mmap each time: 65,536 faults of 4 KiB pages.
_PROBE = """
import ctypes, resource, sys, threading
from absl import flags
from launch import runtime_flags
flags.FLAGS(['probe', '--host_memory=' + sys.argv[1]])
runtime_flags.apply(serving=sys.argv[2] == 'serving')
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size, out = 256 << 20, []
def work():
  for _ in range(2):
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
    out.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
t = threading.Thread(target=work)
t.start(); t.join()
print(out[1])
"""
_PAGES = (256 << 20) // 4096


def _second_round_faults(policy: str, workload: str) -> int:
  done = subprocess.run([sys.executable, '-c', _PROBE, policy, workload], capture_output=True, text=True,
                        timeout=120, check=True)
  return int(done.stdout.split()[-1])


@pytest.mark.skipif(host_memory._glibc() is None, reason='the policy is glibc-only')  # pylint: disable=protected-access
@pytest.mark.parametrize('policy,workload,kept', [
    ('system', 'training', False),  # glibc's default really does refault (the probe can see it)
    ('auto', 'serving', False),
    ('auto', 'training', True),
    ('keep', 'serving', True),
])
def test_freed_block_is_reused_only_under_the_keep_policy(policy, workload, kept):
  faults = _second_round_faults(policy, workload)
  assert (faults < _PAGES // 100) if kept else (faults > _PAGES // 2), faults
