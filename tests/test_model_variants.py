"""Model variants train through `Trainer` on an 8-device mesh with fsdp and tensor parallelism (data=2, fsdp=2,
tensor=2): bf16 compute with f32 parameters, tied embeddings, and remat.

Every variant takes the same few SGD steps (lr 1/16, no momentum, decay or clipping, so the first step's
`(params_before - params_after) / lr` is the gradient) on one fixed batch, from the same initial parameters,
next to the plain f32 untied model without remat:

- remat 'dots_no_batch' gives the same losses, gradient norms and parameters after every step (f32, tight
  tolerance: the parameters move by lr * gradient, so this compares the gradients too); the policies
  'full' and 'dots' are checked the same way on one device in tests/test_train_step.py, and all three are
  checked here to reach the model (its layer body is a checkpoint with exactly that policy);
- bf16 compute runs every matmul on bf16 operands, keeps f32 parameters (at init and after updates) and computes
  the same model up to bf16 rounding;
- tied embeddings have no 'head' parameter, and the table gets the output layer's gradient.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from framework import config as config_lib
from framework.corpus import PackedStream
from framework.data import batch_for_step
from framework.mesh import make_sharder
from framework.models import transformer
from framework.train import Trainer, TrainState

MESH = dict(data=2, fsdp=2, tensor=2)
STEPS = 4
LR = 0.0625  # SGD on the fixed batch: the loss falls at every step (at 1/4 it rises again after one)
BATCH, SEQ, VOCAB, D_MODEL = 16, 16, 512, 64
# Each variant compiles its own train step. On 2 CPU cores XLA's LLVM optimisations take ~2/3 of that time for
# programs this small, so the Trainer's jitted functions (its shardings and donation included) are compiled at
# backend optimisation level 0.
FAST_COMPILE = {'xla_backend_optimization_level': 0}
# Remat recomputes the same f32 ops on the same mesh; only XLA's fusion choices may differ (observed: equal to
# ~1e-7 relative). ATOL on parameters is one float32 ulp at 1.0 (the norm scales).
RTOL, ATOL = 1e-5, 1.2e-7


def make_trainer(**model):
  cfg = config_lib.defaults()
  cfg.model.update(d_model=D_MODEL, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=SEQ,
                   vocab_size=VOCAB, **model)
  cfg.data.seq_len = SEQ
  cfg.train.update(batch_size=BATCH, steps=100)
  cfg.optim.update(name='sgd', lr=LR, momentum=0.0, weight_decay=0.0, grad_clip=0.0, schedule='constant',
                   warmup_steps=0)
  cfg.mesh.update(**MESH)
  config_lib.validate(cfg, num_devices=8)
  trainer = Trainer(cfg, make_sharder(cfg))
  assert dict(trainer.sharder.mesh.shape) == {'data': 2, 'fsdp': 2, 'expert': 1, 'tensor': 2}
  return trainer


def fixed_batch() -> dict:
  """16 packed rows of byte-range tokens (3..258: vocab ids 259..511 never occur)."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, 259, size=4000).astype(np.int32)
  tokens[rng.random(tokens.size) < 0.05] = 1  # BOS: a few documents per row
  return batch_for_step(PackedStream.from_tokens(tokens), 0, seed=0, global_batch=BATCH, seq_len=SEQ)


def flat(tree) -> dict:
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def train(trainer, host_params):
  """STEPS steps on the fixed batch from `host_params`. Returns (flat params on host before and after each
  step, the loss of each step, the gradient norm of each step)."""
  abstract = trainer.abstract_state.params  # exactly what trainer.init would return (eval_shape of it)
  assert jax.tree.structure(host_params) == jax.tree.structure(abstract)
  assert jax.tree.map(lambda x: (x.shape, x.dtype), host_params) == jax.tree.map(lambda x: (x.shape, x.dtype),
                                                                                  abstract)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=host_params,
                     opt_state=trainer.optimizer.init(host_params))
  state = jax.device_put(state, trainer.state_shardings)
  batch = trainer.device_batch(fixed_batch())
  train_step = trainer.train_step.lower(state, batch).compile(FAST_COMPILE)
  params, losses, grad_norms = [flat(host_params)], [], []
  for _ in range(STEPS):
    state, metrics = train_step(state, batch)
    params.append(flat(jax.device_get(state.params)))
    losses.append(float(metrics['loss']))
    grad_norms.append(float(metrics['grad_norm']))
  return params, np.array(losses), np.array(grad_norms)


def first_gradient(params) -> dict:
  return {k: (params[0][k] - params[1][k]) / LR for k in params[0]}


def all_eqns(jaxpr):
  """Every equation of a jaxpr, including those inside scan / remat / pjit bodies."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else (value,):
        sub = getattr(sub, 'jaxpr', sub)  # ClosedJaxpr -> Jaxpr
        if hasattr(sub, 'eqns'):
          yield from all_eqns(sub)


def forward_jaxpr(trainer):
  batch = {k: jnp.asarray(v) for k, v in fixed_batch().items()}
  apply = lambda p: trainer.model.apply({'params': p}, batch['inputs'], batch['positions'], batch['segment_ids'])
  return jax.make_jaxpr(apply)(trainer.abstract_state.params)


def cosine(a, b) -> float:
  return float(np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def assert_falls_and_finite(losses):
  assert np.all(np.isfinite(losses)), losses
  # The model learns this one batch, and that no id past 258 occurs in it: every step lowers the loss (untied:
  # 6.7 -> 4.4 over 3 steps; tied, whose logits start near 0 from the small table: 6.25 -> 6.1).
  assert np.all(np.diff(losses) < 0) and losses[-1] < losses[0] - 0.1, losses


@pytest.fixture(scope='module')
def reference():
  """The f32, untied, remat 'none' model: (its initial params as a host tree, params per step, losses, grad
  norms)."""
  trainer = make_trainer()
  key = jax.random.key(0)
  init = jax.device_get(trainer.init.lower(key).compile(FAST_COMPILE)(key).params)
  return (init, *train(trainer, init))


def test_reference_learns(reference):
  _, params, losses, _ = reference
  assert_falls_and_finite(losses)
  assert max(np.abs(g).max() for g in first_gradient(params).values()) > 1e-2  # the step really moves params
  assert "['head']" in params[0]


# --- remat ---------------------------------------------------------------------------------------------------


def remat_policies_in(jaxpr) -> list:
  return [eqn.params['policy'] for eqn in all_eqns(jaxpr.jaxpr) if eqn.primitive.name == 'remat2']


# What each config name means, written out here (not read from the model code).
JAX_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@pytest.mark.parametrize('policy', sorted(JAX_POLICIES))
def test_remat_policy_reaches_the_model(policy):
  expected = [] if policy == 'none' else [JAX_POLICIES[policy]]  # one checkpoint: the scanned layer body
  assert remat_policies_in(forward_jaxpr(make_trainer(remat_policy=policy))) == expected


def test_remat_dots_no_batch_gives_the_same_losses_and_gradients(reference):
  init, ref_params, ref_losses, ref_grad_norms = reference
  params, losses, grad_norms = train(make_trainer(remat_policy='dots_no_batch'), init)
  assert_falls_and_finite(losses)
  np.testing.assert_allclose(losses, ref_losses, rtol=RTOL)
  np.testing.assert_allclose(grad_norms, ref_grad_norms, rtol=RTOL)
  for step in range(1, STEPS + 1):
    assert params[step].keys() == ref_params[step].keys()
    for k in params[step]:
      np.testing.assert_allclose(params[step][k], ref_params[step][k], rtol=RTOL, atol=ATOL,
                                 err_msg=f'params after step {step}: {k}')


# --- the layer loop: rolled or unrolled ---------------------------------------------------------------------


def loop_unroll(trainer) -> set:
  """The unroll of every scan in the traced forward."""
  return {eqn.params['unroll'] for eqn in all_eqns(forward_jaxpr(trainer).jaxpr) if eqn.primitive.name == 'scan'}


def test_scan_unroll_auto_unrolls_on_cpu_and_follows_the_mesh_platform(reference):
  trainer = make_trainer()  # model.scan_unroll = 0: auto
  assert loop_unroll(trainer) == {2}  # a CPU mesh: every layer in one iteration
  assert transformer.scan_unroll(trainer.model_cfg, trainer.sharder, 2) == 2
  tpu_like = type('TpuSharder', (), {'platform': 'tpu'})()  # what a mesh of TPU devices reports
  assert transformer.scan_unroll(trainer.model_cfg, tpu_like, 2) == 1
  # The rolled loop computes the same thing: same losses, gradients and parameters after every step.
  init, ref_params, ref_losses, _ = reference
  rolled = make_trainer(scan_unroll=1)
  assert loop_unroll(rolled) == {1}
  params, losses, _ = train(rolled, init)
  np.testing.assert_allclose(losses, ref_losses, rtol=RTOL)
  for k in params[STEPS]:
    np.testing.assert_allclose(params[STEPS][k], ref_params[STEPS][k], rtol=RTOL, atol=ATOL, err_msg=k)


def test_scan_unroll_out_of_range_is_refused():
  with pytest.raises(ValueError, match='model.scan_unroll'):
    make_trainer(scan_unroll=3)


# --- bf16 compute, f32 parameters ----------------------------------------------------------------------------


def test_bf16_compute_keeps_f32_params(reference):
  trainer = make_trainer(dtype='bfloat16', param_dtype='float32')
  # What init returns (eval_shape of it): f32 parameters, as the reference's, so both start from the same ones.
  assert {x.dtype for x in jax.tree.leaves(trainer.abstract_state.params)} == {jnp.dtype(jnp.float32)}
  jaxpr = forward_jaxpr(trainer)
  # Activations are bf16: every matmul of the forward pass takes bf16 operands; the logits come out in f32.
  dots = [e for e in all_eqns(jaxpr.jaxpr) if e.primitive.name == 'dot_general']
  assert len(dots) >= 10  # q, k, v, scores, probs @ v, out, gate, up, down (the scan body, once), logits
  assert {str(v.aval.dtype) for e in dots for v in e.invars} == {'bfloat16'}
  assert jaxpr.out_avals[0].dtype == jnp.float32

  init, ref_params, ref_losses, _ = reference
  params, losses, _ = train(trainer, init)
  assert {v.dtype for v in params[-1].values()} == {np.dtype(np.float32)}  # still f32 after the updates
  assert_falls_and_finite(losses)
  # The same model up to bf16 rounding (8-bit mantissa): close to the f32 run, but not equal to it.
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-3)
  assert np.abs(losses - ref_losses).max() > 1e-5
  grads, ref_grads = first_gradient(params), first_gradient(ref_params)
  for k in grads:
    assert cosine(grads[k], ref_grads[k]) > 0.99, k


# --- tied embeddings -----------------------------------------------------------------------------------------


def test_tied_embeddings_have_no_head_and_share_the_table(reference):
  trainer = make_trainer(tie_embeddings=True)
  init, ref_params, _, _ = reference
  assert set(flat(trainer.abstract_state.params)) == set(ref_params[0]) - {"['head']"}
  assert transformer.num_params(trainer.abstract_state.params) == (
      sum(v.size for v in ref_params[0].values()) - D_MODEL * VOCAB)
  # The reference's init without its head (train() checks the tree is the one trainer.init returns).
  params, losses, _ = train(trainer, {k: v for k, v in init.items() if k != 'head'})
  assert_falls_and_finite(losses)
  # The table is the output layer too: rows of ids that never occur in the inputs get gradient from the logits
  # when tied, and none at all when untied (there the table is only gathered from).
  absent = np.setdiff1d(np.arange(VOCAB), fixed_batch()['inputs'])
  assert absent.size > 200
  tied_rows = first_gradient(params)["['embedding']"][absent]
  untied = first_gradient(ref_params)
  assert np.all(untied["['embedding']"][absent] == 0)
  assert np.all(np.abs(tied_rows).max(axis=1) > 0)
  # Those rows get what the untied head's columns get for those ids: the same direction.
  assert cosine(tied_rows, untied["['head']"].T[absent]) > 0.5
