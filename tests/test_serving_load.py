"""The HTTP load test (`launch.bench --suite=serving`): every request answered once, well-formed, with the length
it asked for; the server exits 0 on SIGTERM after it. 40 requests by default, 1,000 with -m slow."""
import json

import pytest

from launch import bench_serving


def test_workload_is_heavy_tailed_fits_the_context_and_shares_prefixes():
  bodies = bench_serving.workload(1000, seed=0)
  caps = sorted(b['max_tokens'] for b in bodies)
  assert caps[500] <= 12 and caps[-1] >= 100  # most short, a long tail
  assert max(len(b['prompt']) + 1 + b['max_tokens'] for b in bodies) < bench_serving.MODEL['max_seq_len']
  assert sum(b['prompt'].startswith('System') for b in bodies) == 334
  assert sum(b['stream'] for b in bodies) == 500


def test_check_catches_lost_duplicated_and_short_answers():
  bodies = bench_serving.workload(3, seed=0)
  rows = [{'index': i, 'id': f'c{i}', 'tokens': b['max_tokens']} for i, b in enumerate(bodies)]
  bench_serving.check(rows, bodies)
  for broken in (rows[:2], rows[:2] + [dict(rows[2], index=1)], rows[:2] + [dict(rows[2], id='c1')],
                 rows[:2] + [dict(rows[2], tokens=rows[2]['tokens'] + 1)]):
    with pytest.raises(bench_serving.LoadError):
      bench_serving.check(broken, bodies)


@pytest.mark.parametrize('requests', [40, pytest.param(1000, marks=pytest.mark.slow)])
def test_load(tmp_path, requests):
  summary = bench_serving.run(requests, str(tmp_path), command='test')
  assert summary['requests'] == requests and summary['server_exit_code'] == 0
  assert summary['completion_tokens'] == sum(b['max_tokens'] for b in bench_serving.workload(requests, seed=0))
  assert summary['latency_p99_s'] >= summary['latency_p50_s'] > 0 and summary['tokens_per_s'] > 0
  assert json.loads((tmp_path / 'summary.json').read_text())['requests'] == requests
  assert (tmp_path / 'latency.png').stat().st_size > 0
  assert len((tmp_path / 'requests.csv').read_text().splitlines()) == requests + 1
