"""The fit verdict and table of launch.compile, on hand-made numbers (no libtpu needed)."""
import re

import pytest

from launch import memory_report as mr

GIB = 1024 ** 3


def test_total_counts_donated_buffers_once():
  r = mr.MemoryReport(arguments=6 * GIB, outputs=5 * GIB, aliased=4 * GIB, temporaries=3 * GIB, code=GIB // 2,
                      hbm=mr.hbm_bytes('TPU v5 lite'))
  assert r.total == 6 * GIB + 5 * GIB - 4 * GIB + 3 * GIB + GIB // 2
  assert r.fits
  assert re.search(r'total +10\.500 GiB +\(65\.6% of HBM\)', mr.format_table(r))


def test_over_hbm_is_refused_with_the_fixes():
  r = mr.MemoryReport(arguments=10 * GIB, outputs=10 * GIB, aliased=10 * GIB, temporaries=7 * GIB, code=0,
                      hbm=16 * GIB)
  assert not r.fits
  line = mr.refusal(r, 'v5e:2x2')
  assert '\n' not in line and '17.00 GiB' in line and '16 GiB' in line
  for fix in ('mesh.fsdp', 'remat_policy', 'micro_batches'):
    assert fix in line


def test_hbm_table():
  assert [mr.hbm_bytes(k) // GIB for k in ('TPU v5 lite', 'TPU v5', 'TPU v4', 'TPU v6 lite')] == [16, 95, 32, 32]
  with pytest.raises(ValueError, match='TPU v9'):
    mr.hbm_bytes('TPU v9')


def test_compiler_refusal_is_one_line_with_xla_reason_and_fixes():
  xla = ('RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (19.44G) '
         'exceeds available HBM (15.75G).\n  allocation 1: ...')
  line = mr.compiler_refusal(xla, '4 x TPU v5 lite')
  assert line.startswith('the train step does not fit on 4 x TPU v5 lite: XLA: Ran out of memory on HBM')
  assert '\n' not in line and '19.44G' in line and 'allocation' not in line and 'remat_policy' in line
