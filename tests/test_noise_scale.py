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


def test_noise_scale_needs_micro_batches_or_batch_shards():
  cfg = config_lib.defaults()
  cfg.noise_scale.enabled = True
  with pytest.raises(ValueError, match='config noise_scale.enabled: .*train.micro_batches >= 2, or shard the batch'):
    config_lib.validate(cfg, num_devices=1)
  config_lib.validate(cfg, num_devices=8)  # one micro-batch on 8 batch shards: the per-shard estimate
  cfg.model.attention_impl = 'pallas'
  with pytest.raises(ValueError, match='config noise_scale.enabled: the per-shard estimate'):
    config_lib.validate(cfg, num_devices=8)


def test_per_shard_terms_without_accumulation_match_a_loop_over_shards():
  """micro_batches=1 on 4 batch shards (data 2 x fsdp 2, tensor 2): |G_small|^2 is the mean over shards of each
  shard's own gradient norm^2, checked against a plain loop over the shards' rows on one device; the step's
  update is the one the plain path (estimate off) makes."""
  from framework import data as data_lib, train as train_lib  # pylint: disable=import-outside-toplevel
  from framework.mesh import Sharder, make_sharder  # pylint: disable=import-outside-toplevel
  from framework.models.transformer import Transformer  # pylint: disable=import-outside-toplevel
  cfg = _cfg(1)
  cfg.train.update(micro_batches=1, micro_grad_norms=False)
  cfg.mesh.update(data=2, fsdp=2, tensor=2)
  cfg = cfg.copy_and_resolve_references()
  config_lib.validate(cfg, num_devices=8)
  trainer = train_lib.Trainer(cfg, make_sharder(cfg, jax.devices()))
  train_data, _ = data_lib.load_splits(cfg.data)
  batch = data_lib.batch_at(train_data, 0, seed=0, global_batch=8, seq_len=32)
  state = trainer.init(jax.random.key(0))
  params = jax.device_get(state.params)
  new_state, m = trainer.train_step(state, trainer.device_batch(batch))

  plain = Transformer(trainer.model_cfg, Sharder(None, trainer.sharder.rules))  # one device, no constraints

  def shard_grad(rows):
    def loss(p):
      logits, _ = plain.apply({'params': p}, rows['inputs'], rows['positions'], rows['segment_ids'])
      t = train_lib.token_losses(logits, rows['targets'], rows['weights'])
      return (t['ce_sum'] + cfg.train.z_loss * t['z_sum']) / t['tokens']
    return jax.grad(loss)(params)
  grads = [shard_grad({k: v[2 * d:2 * d + 2] for k, v in batch.items()}) for d in range(4)]
  sq = [sum(float(np.sum(np.square(g))) for g in jax.tree.leaves(gd)) for gd in grads]
  mean = jax.tree.map(lambda *g: sum(g) / 4, *grads)
  np.testing.assert_allclose(m['gns_small_sq'], np.mean(sq), rtol=1e-4)
  np.testing.assert_allclose(m['gns_big_sq'], sum(float(np.sum(np.square(g))) for g in jax.tree.leaves(mean)),
                             rtol=1e-4)
  assert float(m['gns_b_big']) == 4 * float(m['gns_b_small']) == 8 * 32

  off = cfg.copy_and_resolve_references()
  off.noise_scale.enabled = False
  other = train_lib.Trainer(off, make_sharder(off, jax.devices()))
  expected, _ = other.train_step(other.init(jax.random.key(0)), other.device_batch(batch))
  for a, b in zip(jax.tree.leaves(jax.device_get(new_state.params)), jax.tree.leaves(jax.device_get(expected.params))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


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
