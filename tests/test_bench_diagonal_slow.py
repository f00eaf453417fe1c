"""`launch.bench --suite=diagonal` runs end to end on its smallest case and prints a full row (slow)."""
import pytest

from launch import bench_diagonal

pytestmark = pytest.mark.slow


def test_diagonal_suite_prints_a_row_per_pass(monkeypatch, capsys):
  monkeypatch.setattr(bench_diagonal, 'QUICK', bench_diagonal.CASES[:1])
  bench_diagonal.run(steps=1, quick=True)
  rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith('| 2 | 4 | 64 |')]
  assert [r.split('|')[5].strip() for r in rows] == ['forward', 'forward + backward']
  for r in rows:
    cells = [c.strip() for c in r.strip('|').split('|')]
    assert all(float(c) > 0 for c in cells[5:8]) and cells[8].endswith('x') and cells[10].endswith('%')
