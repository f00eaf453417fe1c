"""The critical-batch-size fits (framework/critical_batch.py) against their formulas, and launch.sweep end to end
on a tiny model: outputs written, finished points skipped on a rerun, a diverged point recorded, SLURM array."""
import csv
import json
import os

import jax
import numpy as np
import pytest

from framework import config as config_lib
from framework import critical_batch
from framework import loop
from launch import sweep


def test_fit_recovers_the_hyperbola():
  s_min, b_crit = 120.0, 48.0
  sizes = np.array([4, 8, 16, 32, 64, 128, 256])
  noise = np.exp(np.random.default_rng(0).normal(0, 0.03, len(sizes)))
  steps = s_min * (1 + b_crit / sizes) * noise  # S(B) = S_min (1 + B_crit / B), 3% noise
  fit = critical_batch.fit_hyperbola(sizes, steps)
  assert fit.s_min == pytest.approx(s_min, rel=0.06) and fit.b_crit == pytest.approx(b_crit, rel=0.1)
  assert fit.e_min == pytest.approx(fit.s_min * fit.b_crit)
  # On the curve: (S/S_min - 1)(E/E_min - 1) = 1 with E = S B.
  for b in (5.0, 50.0, 500.0):
    s = fit.steps(b)
    assert (s / fit.s_min - 1) * (s * b / fit.e_min - 1) == pytest.approx(1.0)
  assert 0.01 < fit.rms_log_error < 0.06
  with pytest.raises(ValueError, match='three or more points'):
    critical_batch.fit_hyperbola([4, 8], [10, 6])


def test_cbs_is_where_steps_exceed_linear_scaling_by_20_percent():
  # Linear scaling from B0 = 8, S0 = 800: 400 at 16, 200 at 32, 100 at 64. Overshoot: 0, 0.1, 0.3 at 16, 32, 64...
  sizes, steps = [8, 16, 32, 64], [800, 400, 220, 130]
  # ... 0.2 is halfway between 32 (0.1) and 64 (0.3) in overshoot, so halfway in log B: sqrt(32 * 64).
  assert critical_batch.linear_scaling_cbs(sizes, steps) == pytest.approx(np.sqrt(32 * 64))
  assert critical_batch.linear_scaling_cbs([8, 16], [800, 400]) is None


def test_crossing_interpolates_between_evaluations():
  assert critical_batch.crossing([10, 20, 30], [3.0, 2.5, 1.5], 2.0) == pytest.approx(25.0)
  assert critical_batch.crossing([10, 20], [3.0, 2.5], 2.0) is None
  assert critical_batch.crossing([10, 20], [1.0, 0.5], 2.0) == 10.0


def tiny_config():
  """A one-layer model that trains in seconds (test_adaptive_batch_study.py starts from it too)."""
  cfg = config_lib.defaults()
  cfg.model.update(d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=64, max_seq_len=32)
  cfg.data.update(seq_len=32, max_corpus_bytes=2_000_000)
  cfg.train.batch_size = 8
  cfg.optim.lr = 3e-3
  cfg.metrics.update(peak_flops_per_device=1e12, tensorboard=False)
  return cfg


SWEEP = dict(batch_sizes=[4, 8, 16], lr_factors=[1.0], target_loss=5.5, max_examples=1024, warmup_examples=32,
             eval_examples=64, eval_set=32)


def test_sweep_writes_the_fit_and_resumes(tmp_path, monkeypatch):
  workdir, out = str(tmp_path / 'points'), str(tmp_path / 'out')
  summary = sweep.sweep(tiny_config(), workdir, out, **SWEEP, command='test', devices=jax.devices()[:1])
  assert summary['reached'] == 3 and {'s_min', 'e_min', 'b_crit'} <= set(summary['fit'])
  for name in ('points.csv', 'summary.json', 'summary.md', 'steps_vs_examples.png', 'steps_vs_batch.png',
               'b_simple.png', 'command.txt'):
    assert os.path.getsize(os.path.join(out, name)) > 0, name
  rows = list(csv.DictReader(open(os.path.join(out, 'points.csv'), encoding='utf-8')))
  assert [int(r['batch_size']) for r in rows] == [4, 8, 16]
  for b in summary['best']:  # steps to target <= the eval that crossed it; examples = steps x batch
    assert b['examples'] == pytest.approx(b['steps'] * b['batch_size'])
    assert b['b_simple_at_target'] > 0
  # LR carried from the reference batch (8) by the sqrt rule.
  assert [b['lr'] for b in summary['best']] == pytest.approx([3e-3 * np.sqrt(0.5), 3e-3, 3e-3 * np.sqrt(2)])

  def must_not_train(*args, **kwargs):
    raise AssertionError('a finished point was trained again')
  monkeypatch.setattr(loop, 'train', must_not_train)
  assert sweep.sweep(tiny_config(), workdir, out, **SWEEP)['best'] == summary['best']


def test_a_diverged_point_is_recorded(tmp_path, monkeypatch):
  def diverge(cfg, workdir, *args, **kwargs):
    os.makedirs(workdir)
    with open(os.path.join(workdir, 'config.json'), 'w', encoding='utf-8') as f:
      json.dump({'optim': {'lr': cfg.optim.lr}}, f)
    raise loop.NonFiniteLossError('Non-finite training at step 3')
  monkeypatch.setattr(loop, 'train', diverge)
  sweep.sweep(tiny_config(), str(tmp_path / 'p'), str(tmp_path / 'o'), **{**SWEEP, 'batch_sizes': [4]}, only_point=0)
  result = json.load(open(tmp_path / 'p' / 'b4_lr1' / 'result.json', encoding='utf-8'))
  assert result['diverged'] and not result['reached']
  assert result['final_eval_loss'] is None and result['evals'] == [] and result['b_simple_at_target'] is None

  def diverge_after_an_eval(cfg, workdir, *args, **kwargs):
    os.makedirs(workdir)
    with open(os.path.join(workdir, 'config.json'), 'w', encoding='utf-8') as f:
      json.dump({'optim': {'lr': cfg.optim.lr}}, f)
    with open(os.path.join(workdir, 'metrics.jsonl'), 'w', encoding='utf-8') as f:
      f.write(json.dumps({'step': 2, 'examples': 8, 'eval_loss': 4.5}) + '\n')
    raise loop.NonFiniteLossError('Non-finite training at step 3')
  monkeypatch.setattr(loop, 'train', diverge_after_an_eval)
  sweep.sweep(tiny_config(), str(tmp_path / 'q'), str(tmp_path / 'o2'), **{**SWEEP, 'batch_sizes': [4]}, only_point=0)
  result = json.load(open(tmp_path / 'q' / 'b4_lr1' / 'result.json', encoding='utf-8'))
  assert result['diverged'] and not result['reached'] and result['steps'] is None
  assert result['final_eval_loss'] == 4.5 and result['evals'] == [[2, 8, 4.5]]  # what it logged before diverging


def test_bad_sweeps_fail_before_training():
  with pytest.raises(ValueError, match='--target_loss must be > 0'):
    sweep.sweep(tiny_config(), '/tmp/x', '/tmp/y', **{**SWEEP, 'target_loss': 0.0})
  with pytest.raises(ValueError, match='--batch_sizes: 6 must be even .* and divide --eval_set=32'):
    sweep.sweep(tiny_config(), '/tmp/x', '/tmp/y', **{**SWEEP, 'batch_sizes': [6]})
  with pytest.raises(ValueError, match='--point=3: the sweep has points 0..2'):
    sweep.sweep(tiny_config(), '/tmp/x', '/tmp/y', **SWEEP, only_point=3)


def test_slurm_script_runs_one_point_per_array_task():
  script = sweep.slurm_script(['--config=configs/lm_tiny.py', '--workdir=/scratch/s', '--target_loss=2',
                               '--write_slurm=s.sbatch'], 18, '/scratch/s')
  assert '#SBATCH --array=0-17' in script
  assert ('python -m launch.sweep --config=configs/lm_tiny.py --workdir=/scratch/s --target_loss=2 '
          '--point="$SLURM_ARRAY_TASK_ID"') in script
  assert '--write_slurm' not in script and '--summarize_only' in script
