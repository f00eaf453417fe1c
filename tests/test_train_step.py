"""One training step is the same computation however it is split.

A step on each of three 8-device meshes equals the step on one device; 4 token-weighted micro-batches equal one
big batch (with very uneven token counts per micro-batch); remat policies do not change the numbers; and the
gradient is exactly d/dparams of (mean CE + z_loss * mean logsumexp^2), computed here from the model's logits.

The optimizer is plain SGD with lr 1, no momentum, decay or clipping, so `params_before - params_after` IS the
gradient: parameter comparisons test the gradients directly, with none of Adam's sign-like normalisation that
turns rounding noise in near-zero gradients into O(lr) parameter differences.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from framework import config as config_lib
from framework.corpus import PackedStream
from framework.data import batch_for_step
from framework.mesh import make_sharder
from framework.train import Trainer
from framework.models.transformer import Transformer

# f32 with 'highest' matmul precision (conftest). Sharded and micro-batched steps sum the same terms in a
# different order (per-shard partial sums, then all-reduce), so results move by rounding only: losses and grad
# norms by ~1e-7 relative, parameters by <= 4e-7 absolute, which uses at most ~1/4 of this budget on any element.
RTOL = 1e-5
ATOL = 1e-6

MESHES = {
    'data8': dict(data=8),
    'data2_fsdp4': dict(data=2, fsdp=4),
    'data2_fsdp2_tensor2': dict(data=2, fsdp=2, tensor=2),
}
MICRO = 4
Z_LOSS = 1e-2  # large enough that its gradient is ~10% of the CE gradient, far above the tolerance


def tiny_config(mesh=None, **train):
  cfg = config_lib.defaults()
  cfg.model.update(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=16, vocab_size=512)
  cfg.data.seq_len = 16
  cfg.train.update(batch_size=16, steps=10, z_loss=Z_LOSS, **train)
  cfg.optim.update(name='sgd', lr=1.0, momentum=0.0, weight_decay=0.0, grad_clip=0.0, schedule='constant',
                   warmup_steps=0)
  cfg.mesh.update(**(mesh or dict(data=1)))
  return cfg


def make_trainer(mesh=None, devices=None, model=None, **train):
  cfg = tiny_config(mesh, **train)
  cfg.model.update(**(model or {}))
  return Trainer(cfg, make_sharder(cfg, devices))


def uneven_batch() -> dict:
  """16 packed rows whose token weights differ wildly between the micro-batches (rows j, j+4, j+8, j+12)."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, 259, size=4000).astype(np.int32)
  tokens[rng.random(tokens.size) < 0.05] = 1  # BOS: documents of ~20 tokens, so rows hold 1-3 segments
  batch = batch_for_step(PackedStream.from_tokens(tokens), 0, seed=0, global_batch=16, seq_len=16)
  weights = batch['weights']
  weights[0::MICRO, 3:] = 0.0  # micro-batch 0: 3 tokens per row at most
  weights[1::MICRO] = 0.0  # micro-batch 1: no tokens at all
  weights[3::MICRO, 8:] = 0.0  # micro-batch 3: half rows
  return batch


def micro_token_counts(batch) -> np.ndarray:
  return np.array([batch['weights'][j::MICRO].sum() for j in range(MICRO)])


def flat(tree) -> dict:
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def assert_trees_close(a, b, what):
  a, b = flat(a), flat(b)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=RTOL, atol=ATOL, err_msg=f'{what}: {k}')


@pytest.fixture(scope='module')
def init_state():
  """The initial state on host, from a one-device init (init is mesh-independent: see test_sharding)."""
  return jax.device_get(make_trainer(devices=jax.devices()[:1]).init(jax.random.key(0)))


def step(trainer, host_state, batch):
  """One step from a fresh copy of `host_state` (train_step donates its state argument)."""
  state = jax.device_put(host_state, trainer.state_shardings)
  new_state, metrics = trainer.train_step(state, trainer.device_batch(batch))
  return jax.device_get(new_state), jax.device_get(metrics)


@pytest.fixture(scope='module')
def reference(init_state):
  """The plain one-device step: the baseline every other variant must reproduce."""
  return step(make_trainer(devices=jax.devices()[:1]), init_state, uneven_batch())


def gradient(init_state, new_state):
  return jax.tree.map(lambda a, b: a - b, init_state.params, new_state.params)


def test_reference_step_really_moves_params(init_state, reference):
  # Guards the comparisons below against a step that does nothing (e.g. a zero learning rate).
  new_state, metrics = reference
  grads = flat(gradient(init_state, new_state))
  assert max(np.abs(g).max() for g in grads.values()) > 1e-2
  assert all(np.abs(g).max() > 0 for g in grads.values())
  assert int(new_state.step) == 1
  assert float(metrics['tokens']) == uneven_batch()['weights'].sum()
  np.testing.assert_allclose(float(metrics['grad_norm']),
                             np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in grads.values())), rtol=RTOL)


@pytest.fixture(scope='module')
def mesh_steps():
  """Results of the sharded steps, kept for the micro-batch comparison on the same mesh."""
  return {}


@pytest.mark.parametrize('mesh_name', sorted(MESHES))
def test_sharded_step_equals_single_device_step(mesh_name, init_state, reference, mesh_steps):
  trainer = make_trainer(MESHES[mesh_name])
  assert trainer.sharder.mesh.size == 8
  mesh_steps[mesh_name] = new_state, metrics = step(trainer, init_state, uneven_batch())
  ref_state, ref_metrics = reference
  assert_trees_close(new_state.params, ref_state.params, f'params after the step on {mesh_name}')
  for key in ('loss', 'z_loss', 'grad_norm', 'param_norm', 'tokens'):
    np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=RTOL, err_msg=key)


@pytest.fixture(scope='module')
def micro_trainer():
  return make_trainer(MESHES['data2_fsdp2_tensor2'], micro_batches=MICRO, micro_grad_norms=True)


def test_micro_batches_equal_one_big_batch(micro_trainer, init_state, reference, mesh_steps):
  batch = uneven_batch()
  counts = micro_token_counts(batch)
  # Uneven on purpose: averaging per-micro-batch means instead of weighting by tokens would be far off here.
  assert counts[1] == 0 and counts[0] < counts[2] / 4 and counts[3] < counts[2]
  new_state, metrics = step(micro_trainer, init_state, batch)
  # Same mesh, one big batch; computed here if the mesh test did not run first (e.g. with -k).
  if 'data2_fsdp2_tensor2' not in mesh_steps:
    mesh_steps['data2_fsdp2_tensor2'] = step(make_trainer(MESHES['data2_fsdp2_tensor2']), init_state, batch)
  big_state, big_metrics = mesh_steps['data2_fsdp2_tensor2']
  assert_trees_close(new_state.params, big_state.params, 'params after 4 micro-batches vs 1 batch')
  for key in ('loss', 'z_loss', 'grad_norm', 'tokens'):
    np.testing.assert_allclose(metrics[key], big_metrics[key], rtol=RTOL, err_msg=key)
  assert_trees_close(new_state.params, reference[0].params, 'params after 4 micro-batches vs one device')


def test_micro_grad_norms_one_per_micro_batch(micro_trainer, init_state):
  batch = uneven_batch()
  _, metrics = step(micro_trainer, init_state, batch)
  norms = np.asarray(metrics['micro_grad_norm'])
  assert norms.shape == (MICRO,)
  assert norms[1] == 0.0  # the micro-batch without tokens contributes no gradient
  assert np.all(np.isfinite(norms)) and np.all(norms[[0, 2, 3]] > 0)
  # When every micro-batch holds the same rows, each one's mean gradient is the whole batch's.
  same = {k: v[np.arange(16) // MICRO] for k, v in uneven_batch().items()}  # micro j = rows j, j+4, ...
  same['weights'] = np.ones_like(same['weights'])
  _, metrics = step(micro_trainer, init_state, same)
  np.testing.assert_allclose(metrics['micro_grad_norm'], np.full(MICRO, metrics['grad_norm']), rtol=RTOL)


def test_micro_grad_norms_off_by_default(reference):
  assert 'micro_grad_norm' not in reference[1]


@pytest.mark.parametrize('policy', ['full', 'dots'])
def test_remat_policy_does_not_change_the_step(policy, init_state, reference):
  trainer = make_trainer(devices=jax.devices()[:1], model=dict(remat_policy=policy))
  new_state, metrics = step(trainer, init_state, uneven_batch())
  ref_state, ref_metrics = reference
  assert_trees_close(new_state.params, ref_state.params, f'params with remat {policy!r}')
  for key in ('loss', 'z_loss', 'grad_norm'):
    np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=RTOL, err_msg=key)


def test_gradient_is_ce_plus_z_loss(init_state, reference):
  """The step's gradient against jax.grad of the loss written out here from the model's logits."""
  trainer = make_trainer(devices=jax.devices()[:1])
  batch = {k: jnp.asarray(v) for k, v in uneven_batch().items()}

  def mean_terms(params):
    logits, _ = trainer.model.apply({'params': params}, batch['inputs'], batch['positions'], batch['segment_ids'])
    lse = jax.nn.logsumexp(logits, axis=-1)
    target = jnp.take_along_axis(logits, batch['targets'][..., None], axis=-1)[..., 0]
    w = batch['weights']
    return jnp.sum((lse - target) * w) / jnp.sum(w), jnp.sum(lse ** 2 * w) / jnp.sum(w)

  def total(params, coef):
    ce, z = mean_terms(params)
    return ce + coef * z, (ce, z)

  # The coefficient is traced, so one compile serves both the z-loss and the CE-only gradient.
  grad_fn = jax.jit(jax.grad(total, has_aux=True))
  g_total, (ce, z) = grad_fn(init_state.params, Z_LOSS)
  g_ce, _ = grad_fn(init_state.params, 0.0)
  new_state, metrics = reference
  np.testing.assert_allclose(metrics['loss'], ce, rtol=RTOL)
  np.testing.assert_allclose(metrics['z_loss'], z, rtol=RTOL)
  step_grad = gradient(init_state, new_state)
  assert_trees_close(step_grad, g_total, 'step gradient vs grad(CE + z_loss * Z)')
  # The z-loss part is far above the tolerance, so a step that dropped it would fail the line above.
  step_flat, ce_flat = flat(step_grad), flat(g_ce)
  assert max(np.abs(step_flat[k] - ce_flat[k]).max() for k in ce_flat) > 100 * ATOL


class CountingTransformer(Transformer):
  """The dense model plus an aux statistic, as an MoE layer adds expert counts: the tokens each call saw."""

  def __call__(self, tokens, positions, segment_ids):
    logits, aux = super().__call__(tokens, positions, segment_ids)
    return logits, {**aux, 'rows_seen': jnp.float32(tokens.shape[0]),
                    'segment_starts': jnp.sum(positions == 0).astype(jnp.float32)}


def test_model_statistics_are_summed_over_micro_batches_and_reported():
  cfg = tiny_config(dict(data=2, fsdp=2), micro_batches=MICRO)
  trainer = Trainer(cfg, make_sharder(cfg, jax.devices()[:4]), model_cls=CountingTransformer)
  batch = uneven_batch()
  _, metrics = trainer.train_step(trainer.init(jax.random.key(0)), trainer.device_batch(batch))
  assert float(metrics['rows_seen']) == cfg.train.batch_size  # 4 micro-batches of 4 rows, summed
  assert float(metrics['segment_starts']) == float(np.sum(batch['positions'] == 0))
