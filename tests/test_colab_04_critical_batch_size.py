"""colabs/04_critical_batch_size.ipynb: a batch-size sweep to a target held-out loss, the hyperbola fit and B_crit,
the online noise scale B_simple, and an adaptive batch against fixed ones, each asserted in its own cells. Here its
figures are checked against the runs' own metrics.jsonl, read anew, and a least-squares fit written here."""
import json
import math

import numpy as np

from notebook_runner import REPO, run_notebook


def _records(run_dir):
  with open(run_dir / 'metrics.jsonl', encoding='utf-8') as f:
    return [json.loads(line) for line in f if line.strip()]


def _first_crossing(xs, losses, target):
  """x where the loss first reaches `target`, linear between the evaluations around it."""
  for i, loss in enumerate(losses):
    if loss <= target:
      if i == 0:
        return xs[0]
      return xs[i - 1] + (losses[i - 1] - target) / (losses[i - 1] - loss) * (xs[i] - xs[i - 1])
  return None


def _fit(batch, steps):
  """(S_min, B_crit) minimising sum (log S - log(S_min (1 + B_crit / B)))^2: for a fixed B_crit the best log S_min is
  the mean residual, so only B_crit is searched (a log grid, then golden-section refinement)."""
  batch, log_s = np.asarray(batch, float), np.log(np.asarray(steps, float))

  def cost(u):
    r = log_s - np.log1p(np.exp(u) / batch)
    return np.sum((r - r.mean()) ** 2), np.exp(r.mean())
  grid = np.linspace(np.log(batch.min()) - 8, np.log(batch.max()) + 8, 4001)
  i = int(np.argmin([cost(u)[0] for u in grid]))
  lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
  g = (math.sqrt(5) - 1) / 2
  for _ in range(100):
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    lo, hi = (lo, b) if cost(a)[0] < cost(b)[0] else (a, hi)
  u = (lo + hi) / 2
  return cost(u)[1], math.exp(u)


def test_critical_batch_size_notebook(tmp_path):
  from configs import lm_tiny
  import nbformat
  notebook = nbformat.read(REPO / 'colabs' / '04_critical_batch_size.ipynb', as_version=4)
  assert notebook.nbformat == 4 and notebook.metadata['kernelspec']['name'] == 'python3'
  assert all(not c.outputs and c.execution_count is None for c in notebook.cells if c.cell_type == 'code')
  # The fit written here recovers an exact hyperbola (S_min 40, B_crit 10) before it checks the notebook's.
  assert np.allclose(_fit([4, 8, 16], 40 * (1 + 10 / np.array([4, 8, 16]))), (40, 10), rtol=1e-4)

  result = run_notebook('04_critical_batch_size.ipynb', workdir=tmp_path)
  assert result['_plots'] == 4  # the fit, B_simple, adaptive vs fixed, and the committed sweep's figure
  target, seq_len = result['target_loss'], result['seq_len']
  base = lm_tiny.get_config()

  # Every point, against its own metrics.jsonl: the target reached (the test's settings all reach it), steps and
  # examples at the crossing, the sqrt-rule LR, and B_simple at the target in sequences.
  points = result['points']
  assert [p['batch_size'] for p in points] == [4, 8, 16]
  for p in points:
    assert p['reached'] and not p['diverged'], p
    records = _records(tmp_path / 'sweep' / f"b{p['batch_size']}_lr{p['factor']:g}")
    evals = [r for r in records if 'eval_loss' in r]
    losses = [r['eval_loss'] for r in evals]
    assert losses[-1] <= target < min(losses[:-1]) and p['final_eval_loss'] == losses[-1]
    assert math.isclose(p['steps'], _first_crossing([r['step'] for r in evals], losses, target), rel_tol=1e-9)
    assert math.isclose(p['examples'], _first_crossing([r['examples'] for r in evals], losses, target),
                        rel_tol=1e-9)
    assert math.isclose(p['examples'], p['steps'] * p['batch_size'], rel_tol=1e-9)
    assert math.isclose(p['lr'], base.optim.lr * p['factor'] * math.sqrt(p['batch_size'] / base.train.batch_size))
    noise = [r['b_simple'] / seq_len for r in records if 'b_simple' in r and r['examples'] <= p['examples']]
    assert math.isclose(p['b_simple_at_target'], float(np.median(noise[-4:])), rel_tol=1e-9)
    assert math.isfinite(p['b_simple_at_target']) and p['b_simple_at_target'] > 0
    assert result['b_simple_at_target'][str(p['batch_size'])] == p['b_simple_at_target']

  # The shape: fewer steps, no fewer examples, as the batch grows.
  sizes = [p['batch_size'] for p in points]
  steps, examples = [p['steps'] for p in points], [p['examples'] for p in points]
  assert steps[0] > steps[1] > steps[2] and examples[0] <= examples[1] <= examples[2], (steps, examples)

  # The notebook's fit against a fit written here; B_crit = E_min / S_min, and the fitted curve is the hyperbola.
  fit = result['fit']
  s_min, b_crit = _fit(sizes, steps)
  assert math.isclose(fit['s_min'], s_min, rel_tol=1e-3) and math.isclose(fit['b_crit'], b_crit, rel_tol=1e-3), (
      fit, s_min, b_crit)
  assert math.isclose(fit['e_min'], s_min * b_crit, rel_tol=2e-3)
  assert math.isclose(fit['b_crit'], fit['e_min'] / fit['s_min'], rel_tol=1e-9)
  for b in sizes:
    s = fit['s_min'] * (1 + fit['b_crit'] / b)
    assert math.isclose((s / fit['s_min'] - 1) * (s * b / fit['e_min'] - 1), 1.0, rel_tol=1e-9)
  # The 20% rule: where the steps first exceed perfect linear scaling from the smallest batch by 20%, interpolated
  # in log B between the batch sizes around it (None: not within the sweep).
  over = [s * b / (steps[0] * sizes[0]) - 1 for s, b in zip(steps, sizes)]
  i = next((i for i, o in enumerate(over) if o > 0.2), None)
  if i is None:
    assert result['cbs_20pct'] is None
  else:
    t = (0.2 - over[i - 1]) / (over[i] - over[i - 1])
    assert math.isclose(result['cbs_20pct'], sizes[i - 1] * (sizes[i] / sizes[i - 1]) ** t, rel_tol=1e-9)
  true_s, true_e = result['synthetic']['true']
  assert np.allclose(result['synthetic']['fit'], [true_s, true_e], rtol=0.01)

  # The adaptive run's batches, read from its metrics: from the first rung up, never down, always on the ladder.
  adaptive = result['adaptive']
  ladder = adaptive['ladder']
  assert ladder == [4, 8, 16]  # the test's settings
  logged = [r['batch_size'] for r in _records(tmp_path / 'adaptive' / 'adaptive')]
  assert logged == adaptive['batch_sizes'] and logged[0] == ladder[0]
  assert logged == sorted(logged) and set(logged) <= set(ladder), logged
  assert {r['batch_size'] for r in _records(tmp_path / 'adaptive' / 'fixed_small')} == {ladder[0]}
  assert {r['batch_size'] for r in _records(tmp_path / 'adaptive' / 'fixed_large')} == {ladder[-1]}
  budget = adaptive['budget_examples']
  assert all(budget <= e < budget + ladder[-1] for e in adaptive['examples'].values()), adaptive['examples']

  # The committed sweep's figures, as shown: those of results/sweep/summary.json.
  with open(REPO / 'results' / 'sweep' / 'summary.json', encoding='utf-8') as f:
    committed = json.load(f)
  assert result['committed'] == {'b_crit': committed['fit']['b_crit'], 'cbs_20pct': committed['cbs_20pct'],
                                 'b_simple_at_target_median': committed['b_simple_at_target_median']}
