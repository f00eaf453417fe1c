"""colabs/05_diagonal_batching.ipynb runs top to bottom in a fresh kernel, and what it reports holds.

The notebook asserts its claims in its own cells: the sequential and the diagonal ARMT executors give the same
logits, final memory and gradients within a stated tolerance, the executors run L x S cell steps and L + S - 1
wavefront steps, and the wavefront schedule runs every (layer, segment) cell once, after the cells it depends on.
Here its reported figures are checked against what this process works out for itself: the step formulas, the
schedule from armt.wavefronts and the anti-diagonals enumerated by hand, the step counts both executors return when
they run a toy cell here, and the tolerance applied to the reported differences. Speed is only shown, not checked.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from framework.models import armt
from notebook_runner import run_notebook


@pytest.fixture(scope='module')
def result() -> dict:
  return run_notebook('05_diagonal_batching.ipynb')


def test_runs_and_draws(result):
  assert result['backend'] == 'cpu'
  assert result['_plots'] == 2  # the wavefront grids and the timings, saved under build/notebook_plots/
  L, S = result['n_layers'], result['n_segments']
  assert L >= 2 and S > L  # a case with underfull and full wavefronts (the unrolled steps and the scan)
  assert result['n_tokens'] == S * result['seg_len']


def test_step_counts_follow_the_formulas(result):
  L, S = result['n_layers'], result['n_segments']
  assert result['steps_sequential'] == L * S
  assert result['steps_diagonal'] == L + S - 1 == len(armt.wavefronts(L, S))


def test_schedule_is_the_anti_diagonals(result):
  L, S = result['n_layers'], result['n_segments']
  schedule = [tuple(w) for w in result['schedule']]
  assert schedule == armt.wavefronts(L, S)
  step_of = {}
  for t, (lo, hi) in enumerate(schedule):
    cells = {(l, t - l) for l in range(lo, hi + 1)}
    assert cells == {(l, t - l) for l in range(L) if 0 <= t - l < S}, t  # every cell with l + s = t, no other
    step_of.update({cell: t for cell in cells})
  assert len(step_of) == L * S
  for (l, s), t in step_of.items():
    assert all(step_of[dep] < t for dep in ((l - 1, s), (l, s - 1)) if min(dep) >= 0)


def test_executors_count_the_same_steps_here(result):
  """Both executors run a toy cell (each layer adds its own offset, the memory sums what it saw) for the
  notebook's (layers, segments): the steps they return, and their results, agree with the notebook's counts."""
  L, S = result['n_layers'], result['n_segments']
  batch, rows, d, d_key = 2, 3, 4, 5
  layers = jnp.arange(1.0, L + 1.0)
  memory = {'w': jnp.zeros(L)}
  x_in = jax.random.normal(jax.random.key(0), (S, batch, rows, d))
  sids = jnp.ones((S, batch, rows), jnp.int32)
  a0, z0 = jnp.zeros((L, batch, d_key, d)), jnp.zeros((L, batch, d_key))

  def cell(p, w, h, a, z, first, sid):
    del w, sid
    a = jnp.where(first, 0.0, a) + jnp.mean(h, axis=1)[:, None, :]
    return 0.5 * h + p, a, z + 1.0

  outs = {}
  for name, executor in (('sequential', armt.run_sequential), ('diagonal', armt.run_diagonal)):
    ys, (a, z), steps = executor(cell, layers, memory, x_in, sids, a0, z0)
    outs[name] = (ys, a, z)
    assert steps == result[f'steps_{name}'], name
  for x, y in zip(outs['sequential'], outs['diagonal']):
    np.testing.assert_allclose(y, x, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(outs['diagonal'][2], S)  # every layer's memory saw every segment once


def test_differences_are_within_the_stated_tolerance(result):
  assert (result['rtol'], result['atol_share']) == (1e-4, 2e-5)  # tests/test_armt.py's f32 tolerance
  bound = 1e-4 + 2e-5  # |diff| <= rtol |x| + atol_share max|x| <= (rtol + atol_share) max|x|
  for name in ('logit', 'A', 'z'):
    diff, scale = result[f'max_abs_{name}_diff'], result[f'max_abs_{name}']
    assert math.isfinite(scale) and scale > 0, name
    assert 0.0 <= diff <= bound * scale, (name, diff, scale)
  assert result['max_abs_A'] > 0.1  # the memory carries something: the comparison is not between two zeros
  # Every parameter's gradient was compared: the memory's projections and embeddings and the stacked layers too.
  names = set(result['gradient_names'])
  assert {"['mem_wv']", "['mem_wq']", "['mem_wk']", "['memory']", "['embedding']", "['layers']['mlp']['wo']"} <= names
  assert 0.0 <= result['max_grad_rel_diff'] <= bound


def test_timings_are_reported(result):
  timings = result['timings']
  assert timings and result['repeats'] >= 1
  for row in timings:
    for pass_name in ('forward_ms', 'forward_backward_ms'):
      assert set(row[pass_name]) == {'sequential', 'diagonal'}
      assert all(math.isfinite(t) and t > 0 for t in row[pass_name].values()), row
