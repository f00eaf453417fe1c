"""colabs/03_moe_global_balance.ipynb runs top to bottom at its test size, and what it prints is what it computed.

The notebook asserts its own facts (the balance-scope formulas against numpy, the load fractions, the mutual
information against the routing counts, a falling loss). Here its printed figures are checked against what it left
on disk, recomputed in this process in another way: part (a) from the router logits it saved, with group membership
matrices instead of its row lists; part (b) from each run's metrics.jsonl and config.json, the mutual information as
H(domain) + H(expert) - H(domain, expert); part (c) from results/moe_balance/summary.json.
"""
import json
import math

import numpy as np

from notebook_runner import REPO, run_notebook

NAME = '03_moe_global_balance.ipynb'


def _entropy(p, axis):
  return -np.sum(np.where(p > 0, p * np.log2(np.where(p > 0, p, 1.0)), 0.0), axis=axis)


def _mutual_information(domain_counts):
  """Bits per layer from counts [layer, domain, expert]."""
  joint = domain_counts / domain_counts.sum((1, 2), keepdims=True)
  return _entropy(joint.sum(2), 1) + _entropy(joint.sum(1), 1) - _entropy(joint.reshape(len(joint), -1), 1)


def _balance_losses(logits, k, n_micro):
  """The step's balance loss for each scope, from router logits [B, S, E]: groups as membership matrices."""
  b, s, e = logits.shape
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  kth = np.sort(logits, -1)[..., -k][..., None]
  slots = (logits >= kth).sum(1).astype(np.float64)  # [B, E]: each sequence's routing slots per expert
  mass = probs.sum(1)  # [B, E]
  rows = np.arange(b)
  membership = {'sequence': np.eye(b), 'micro': (rows[None] % n_micro == np.arange(n_micro)[:, None]) * 1.0,
                'global': np.ones((1, b))}
  losses = {}
  for scope, g in membership.items():
    tokens = g.sum(1, keepdims=True) * s
    losses[scope] = float(np.mean(e * np.sum((g @ slots) / (tokens * k) * (g @ mass) / tokens, -1)))
  # Running form across the micro-batches: micro-batch j's f pools micro-batches 0..j.
  g = membership['micro']
  seen = np.cumsum(g @ slots, 0) / (np.arange(1, n_micro + 1)[:, None] * (b // n_micro) * s * k)
  losses['global, running form'] = float(np.sum(e * np.sum(seen * (g @ mass), -1)) / (b * s))
  return losses


def test_moe_global_balance_notebook(tmp_path):
  result = run_notebook(NAME, workdir=tmp_path)
  assert result['workdir'] == str(tmp_path) and result['test'] and not result['big'], result['workdir']
  assert result['_plots'] >= 6, result['_plots']  # (a) fractions, loss curves, load heatmaps, domain routing, (c) x2

  # (a) the balance loss at each scope, recomputed from the router logits the notebook saved.
  shape = result['scope_check']
  logits = np.load(tmp_path / 'router_logits.npy').astype(np.float64)
  assert logits.shape == (shape['batch'], shape['seq_len'], shape['experts'])
  losses = _balance_losses(logits, shape['top_k'], shape['micro_batches'])
  for scope, value in losses.items():
    np.testing.assert_allclose(result['balance_loss'][scope], value, rtol=1e-6, err_msg=scope)
    np.testing.assert_allclose(result['balance_loss_numpy'][scope], value, rtol=1e-9, err_msg=scope)
  # Measured: sequence 2.15, micro 2.13, global 1.00 (the pooled load is even), running form 1.40.
  assert losses['micro'] - losses['global'] > 0.5 and abs(losses['global'] - 1.0) < 0.05, losses
  assert abs(losses['global, running form'] - losses['global']) > 0.1, losses
  np.testing.assert_allclose(result['micro_minus_global_covariance'], losses['micro'] - losses['global'], rtol=1e-6)

  # (b) both runs, from the files loop.train wrote.
  for scope in ('micro', 'global'):
    claimed = result['runs'][scope]
    cfg = json.loads((tmp_path / scope / 'config.json').read_text())
    assert cfg['moe']['balance_scope'] == scope and cfg['data']['source'] == 'domains'
    rows = [json.loads(line) for line in (tmp_path / scope / 'metrics.jsonl').read_text().splitlines()]
    train = [r for r in rows if 'moe_counts' in r]
    assert [r['step'] for r in train] == claimed['steps'] and claimed['steps'][-1] == cfg['train']['steps']
    assert [r['loss'] for r in train] == claimed['losses']
    assert all(math.isfinite(x) for x in claimed['losses']) and claimed['losses'][-1] < claimed['losses'][0]
    experts = cfg['moe']['num_experts']
    slots = cfg['train']['batch_size'] * cfg['data']['seq_len'] * cfg['moe']['top_k']
    for r in train:
      counts = np.asarray(r['moe_counts'], np.float64)
      assert counts.shape == (cfg['model']['n_layers'], experts)
      np.testing.assert_array_equal(counts.sum(-1), slots)
      np.testing.assert_allclose(np.asarray(r['moe_load']).sum(-1), 1.0, atol=1e-6)
      np.testing.assert_allclose(_mutual_information(np.asarray(r['moe_domain_counts'], np.float64)),
                                 r['moe_domain_mi'], atol=1e-6)
    last = train[-3:]
    mi_last = _mutual_information(np.asarray(last[-1]['moe_domain_counts'], np.float64))
    np.testing.assert_allclose(claimed['mi_last_per_layer'], mi_last, atol=1e-9)
    np.testing.assert_allclose(claimed['mi_bits'], np.mean(
        [np.mean(_mutual_information(np.asarray(r['moe_domain_counts'], np.float64))) for r in last]), atol=1e-9)
    assert 0.0 <= claimed['mi_bits'] <= math.log2(min(4, experts)) and claimed['mi_max_abs_error'] < 1e-6
    counts = np.sum([r['moe_counts'] for r in last], axis=0)
    np.testing.assert_allclose(claimed['load'], counts / counts.sum(-1, keepdims=True), rtol=1e-9)
    np.testing.assert_allclose(claimed['max_over_mean'], np.mean(
        [np.mean(np.max(r['moe_counts'], -1) / np.mean(r['moe_counts'], -1)) for r in last]), rtol=1e-9)

  # (c) the committed study, as the notebook showed it.
  study_dir = REPO / 'results' / 'moe_balance'
  study = json.loads((study_dir / 'summary.json').read_text())
  assert result['study']['command'] == (study_dir / 'command.txt').read_text().strip()
  means = result['study']['group_means']
  assert sorted(means) == sorted({r['label'] for r in study})
  for label, figures in means.items():
    runs = [r for r in study if r['label'] == label]
    for key, value in figures.items():
      np.testing.assert_allclose(value, np.mean([r[key] for r in runs]), rtol=1e-12, err_msg=f'{label} {key}')
