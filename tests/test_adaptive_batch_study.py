"""launch.adaptive_batch end to end on a tiny model (slow): three runs at one example budget, the adaptive one
climbing the ladder, and the table, CSV and plot agreeing with the runs' logged metrics."""
import csv
import json
import os

import jax
import pytest

from framework import metrics as metrics_lib
from launch import adaptive_batch
from test_sweep import tiny_config

pytestmark = pytest.mark.slow


def test_adaptive_study_end_to_end(tmp_path, monkeypatch):
  monkeypatch.setattr(adaptive_batch.study_io, 'load_config', lambda path: tiny_config())
  workdir, out = str(tmp_path / 'runs'), str(tmp_path / 'out')
  runs = adaptive_batch.study('tiny', workdir, out, ['4', '8', '16'], 2, 256, 0.5, 64, 32, command='test',
                              devices=jax.devices()[:1])
  assert set(runs) == {'fixed_small', 'fixed_large', 'adaptive'}
  assert runs['fixed_small']['batch_sizes'] == [4] and runs['fixed_large']['batch_sizes'] == [16]
  assert len(runs['adaptive']['batch_sizes']) > 1  # the norm test grew the batch
  assert {r['examples'] for r in runs.values()} == {256}  # the same budget
  summary = json.load(open(os.path.join(out, 'summary.json'), encoding='utf-8'))
  for name, r in runs.items():
    records = metrics_lib.read_records(os.path.join(workdir, name))
    assert summary[name]['final_eval_loss'] == [x for x in records if 'eval_loss' in x][-1]['eval_loss']
  rows = list(csv.DictReader(open(os.path.join(out, 'runs.csv'), encoding='utf-8')))
  assert len(rows) == sum(len(r['evals']) for r in runs.values())
  assert os.path.getsize(os.path.join(out, 'loss.png')) > 0
