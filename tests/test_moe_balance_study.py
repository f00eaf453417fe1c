"""The balance study's entry point end to end at toy size: runs train, the table and plots are written and agree."""
import csv
import json
import os

import numpy as np
import pytest

from launch import moe_balance

TINY = {'model.d_model': 32, 'model.n_layers': 2, 'model.n_heads': 2, 'model.n_kv_heads': 2, 'model.d_ff': 64,
        'moe.d_ff_expert': 32, 'moe.num_experts': 4, 'data.seq_len': 32, 'data.max_corpus_bytes': 400_000,
        'train.batch_size': 8, 'train.log_every': 2, 'train.eval_every': 4, 'train.eval_batches': 1,
        'checkpoint.every_steps': 4}


@pytest.mark.slow  # two short training runs: ~1 minute
def test_study_writes_a_consistent_table_and_plots(tmp_path):
  out = tmp_path / 'out'
  runs = moe_balance.study('configs/moe_tiny.py', str(tmp_path / 'runs'), str(out), groups=['2', '8'], seeds=['0'],
                           steps=4, overrides=TINY)
  assert [r['label'] for r in runs] == ['micro (2)', 'global (8)']
  for name in ('summary.csv', 'summary.md', 'summary.json', 'command.txt', 'loss.png', 'load.png', 'heatmaps.png',
               'specialization.png'):
    assert (out / name).stat().st_size > 0, name
  with open(out / 'summary.csv', encoding='utf-8') as f:
    rows = list(csv.DictReader(f))
  assert [int(r['group']) for r in rows] == [2, 8]
  for row, run in zip(rows, runs):
    assert np.isfinite(float(row['heldout_loss']))
    assert 0.0 <= float(row['domain_expert_mi_bits']) <= 2.0  # log2(4 domains)
    assert float(row['max_over_mean']) >= 1.0
    # The table's MI is the metric the train step logged (moe_domain_mi), averaged over the last records.
    logged = [r for r in run['records'] if 'moe_domain_mi' in r][-moe_balance.LAST:]
    np.testing.assert_allclose(float(row['domain_expert_mi_bits']),
                               np.mean([np.mean(r['moe_domain_mi']) for r in logged]), atol=1e-4)
    p = np.asarray(run['p_expert_given_domain'])
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-6)  # a distribution over experts per domain and layer
  assert json.loads((out / 'summary.json').read_text())[1]['group'] == 8
  assert os.path.isdir(tmp_path / 'runs' / 'group8_seed0' / 'checkpoints')
