"""The gradient-noise-scale estimate: recovers a known B_simple, matches the step's gradients, survives a resume."""
import json

import jax
import numpy as np
import pytest

from framework import config as config_lib
from framework import loop
from framework import noise_scale


def test_two_batch_estimates_recover_a_known_noise_scale_in_linear_regression():
  # Per-example loss 0.5 (x.w - y)^2, x ~ N(0, I_d), y = x.w* + N(0, s^2), at w = w* + delta: the gradient
  # g = x (x.delta - eps) has mean G = delta and (Isserlis) E[g g^T] = |delta|^2 I + 2 delta delta^T + s^2 I, so
  # tr(Sigma) = (d + 1)|delta|^2 + d s^2 and B_simple = tr(Sigma) / |delta|^2, in closed form.
  rng = np.random.default_rng(0)
  d, sigma, b_small, n_small = 16, 2.0, 8, 8
  delta = rng.standard_normal(d) * 0.5
  expected = ((d + 1) * delta @ delta + d * sigma ** 2) / (delta @ delta)
  ns = noise_scale.NoiseScale(ema=0.995)
  for _ in range(3000):
    x = rng.standard_normal((n_small, b_small, d))
    eps = rng.standard_normal((n_small, b_small)) * sigma
    g = x * (x @ delta - eps)[..., None]  # per-example gradients
    small = g.mean(1)  # each micro-batch's mean gradient
    values = ns.update({'gns_small_sq': np.mean(np.sum(small ** 2, -1)), 'gns_big_sq': np.sum(small.mean(0) ** 2),
                        'gns_b_small': b_small, 'gns_b_big': b_small * n_small})
  assert values['b_simple'] == pytest.approx(expected, rel=0.1)
  assert values['noise_g2'] == pytest.approx(delta @ delta, rel=0.1)


def test_two_batch_estimates_refuse_batch_sizes_out_of_order():
  with pytest.raises(ValueError, match='b_small < b_big'):
    noise_scale.two_batch_estimates(1.0, 0.5, 8, 8)


def test_noise_scale_needs_micro_batches():
  cfg = config_lib.defaults()
  cfg.noise_scale.enabled = True
  with pytest.raises(ValueError, match='config noise_scale.enabled'):
    config_lib.validate(cfg, num_devices=8)


def _cfg(steps):
  cfg = config_lib.defaults()
  cfg.model.update(d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=64, max_seq_len=32)
  cfg.data.update(seq_len=32, max_corpus_bytes=2_000_000)
  cfg.train.update(steps=steps, batch_size=8, micro_batches=4, log_every=1, eval_every=0, micro_grad_norms=True)
  cfg.noise_scale.update(enabled=True, ema=0.5)
  cfg.checkpoint.update(every_steps=2, async_save=False)
  return cfg


def _records(workdir):
  with open(workdir / 'metrics.jsonl', encoding='utf-8') as f:
    return {r['step']: r for r in map(json.loads, f)}


def _straight(workdir, steps):
  loop.train(_cfg(steps), str(workdir), devices=jax.devices()[:1])
  return _records(workdir)


def test_terms_come_from_the_steps_gradients(tmp_path):
  r = _straight(tmp_path, 1)[1]
  # The step's own gradient norms, independent code paths: the accumulated one and each micro-batch's.
  np.testing.assert_allclose(r['gns_big_sq'], r['grad_norm'] ** 2, rtol=1e-5)
  np.testing.assert_allclose(r['gns_small_sq'], np.mean(np.square(r['micro_grad_norm'])), rtol=1e-5)
  assert r['gns_b_big'] == pytest.approx(4 * r['gns_b_small'])
  g2, trace = noise_scale.two_batch_estimates(r['gns_small_sq'], r['gns_big_sq'], r['gns_b_small'], r['gns_b_big'])
  assert r['b_simple'] == pytest.approx(trace / g2, rel=1e-6)  # one step: the bias-corrected EMA is the estimate


@pytest.mark.slow
def test_a_resumed_run_continues_the_estimate(tmp_path):
  straight = _straight(tmp_path / 'straight', 4)
  # Interrupted after step 2 and resumed: the EMA continues from the checkpoint.
  loop.train(_cfg(2), str(tmp_path / 'resumed'), devices=jax.devices()[:1])
  loop.train(_cfg(4), str(tmp_path / 'resumed'), devices=jax.devices()[:1])
  resumed = _records(tmp_path / 'resumed')
  for step in (3, 4):
    assert resumed[step]['b_simple'] == pytest.approx(straight[step]['b_simple'], rel=1e-6)
