"""Mixture of experts: routing, both dispatch paths against plain references, and the balance scopes.

Every comparison is against something written here: the dropless experts against every expert applied to every
token weighted by the router, the capacity path against a loop that hands out slots one choice at a time, the
balance losses against their formulas from the router probabilities, the sharded and micro-batched steps against
the one-device whole-batch step, and the running form of the global loss against a plain loop over micro-batches.
As in test_train_step, the optimizer is SGD with lr 1, so `params_before - params_after` is the gradient.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from framework import config as config_lib
from framework.mesh import Sharder, make_sharder
from framework.models import moe as moe_lib
from framework.models import moe_dispatch
from framework.models.moe_config import MoEConfig
from framework.train import Trainer, split_micro_batches, token_losses

RTOL, ATOL = 1e-5, 1e-6
E, K, SEQ, BATCH = 4, 2, 16, 16
BALANCE_WEIGHT = 0.5  # large, so the balance gradient is far above the tolerance


def moe_cfg(mesh=None, micro_batches=1, n_layers=1, **moe):
  cfg = config_lib.defaults()
  # One layer: every step here compiles in a few seconds (the layer loop is unrolled on CPU); the every=2 test
  # below uses two.
  cfg.model.update(d_model=32, n_layers=n_layers, n_heads=2, n_kv_heads=2, d_ff=64, max_seq_len=SEQ,
                   vocab_size=512)
  cfg.data.seq_len = SEQ
  cfg.train.update(batch_size=BATCH, micro_batches=micro_batches, steps=10, z_loss=0.0)
  cfg.optim.update(name='sgd', lr=1.0, momentum=0.0, weight_decay=0.0, grad_clip=0.0, schedule='constant',
                   warmup_steps=0)
  cfg.moe.update(**{'num_experts': E, 'top_k': K, 'router_z_loss': 1e-2, 'balance_weight': BALANCE_WEIGHT, **moe})
  cfg.mesh.update(**{'data': 1, **(mesh or {})})
  return cfg


def trainer_for(cfg, n_devices=None):
  n = n_devices or int(np.prod([v for k, v in cfg.mesh.items() if k in ('data', 'fsdp', 'expert', 'tensor')]))
  config_lib.validate(cfg, num_devices=n)
  return Trainer(cfg, make_sharder(cfg, jax.devices()[:n]))


def batch() -> dict:
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, 259, size=(BATCH, SEQ + 1)).astype(np.int32)
  # Half the rows from a narrow token range: their routing differs from the others', so 'micro' != 'global'.
  tokens[::2] = tokens[::2] % 16 + 3
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'segment_ids': np.ones((BATCH, SEQ), np.int32),
          'positions': np.tile(np.arange(SEQ, dtype=np.int32), (BATCH, 1)), 'weights': np.ones((BATCH, SEQ),
                                                                                                np.float32)}


def flat(tree) -> dict:
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def assert_trees_close(a, b, what, rtol=RTOL, atol=ATOL):
  a, b = flat(a), flat(b)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=atol, err_msg=f'{what}: {k}')


@pytest.fixture(scope='module')
def init_params():
  return jax.device_get(trainer_for(moe_cfg()).init(jax.random.key(0)))


def step(cfg, host_state, n_devices=None):
  trainer = trainer_for(cfg, n_devices)
  state = jax.device_put(host_state, trainer.state_shardings)
  new_state, metrics = trainer.train_step(state, trainer.device_batch(batch()))
  new_state, metrics = jax.device_get((new_state, metrics))
  return jax.tree.map(lambda a, b: a - b, host_state.params, new_state.params), metrics


# --- routing and dispatch ---------------------------------------------------------------------------------------


def _moe(**kw):
  cfg = moe_cfg(**kw)
  return MoEConfig.from_config(cfg, 1)


def test_softmax_router_picks_the_top_k_and_renormalises():
  logits = jnp.asarray(np.random.default_rng(1).standard_normal((3, 5, E)), jnp.float32)
  idx, gates, probs = moe_lib.route(logits, _moe())
  p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  top = np.argsort(-p, axis=-1)[..., :K]
  np.testing.assert_array_equal(np.asarray(idx), top)
  chosen = np.take_along_axis(p, top, -1)
  np.testing.assert_allclose(gates, chosen / chosen.sum(-1, keepdims=True), rtol=1e-6)
  np.testing.assert_allclose(probs, p, rtol=1e-6)


def test_sigmoid_router_normalises_the_chosen_scores():
  logits = jnp.asarray(np.random.default_rng(2).standard_normal((3, 5, E)), jnp.float32)
  idx, gates, probs = moe_lib.route(logits, _moe(router='sigmoid'))
  s = 1 / (1 + np.exp(-np.asarray(logits)))
  top = np.argsort(-s, axis=-1)[..., :K]
  np.testing.assert_array_equal(np.asarray(idx), top)
  chosen = np.take_along_axis(s, top, -1)
  np.testing.assert_allclose(gates, chosen / chosen.sum(-1, keepdims=True), rtol=1e-6)
  np.testing.assert_allclose(probs, s / s.sum(-1, keepdims=True), rtol=1e-6)


def _expert_inputs(seed=0, b=3, s=12, d=16, f=24, skew=False):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((b, s, d)), jnp.float32)
  logits = rng.standard_normal((b, s, E)) + (np.array([3.0, 0, 0, 0]) if skew else 0)
  idx, gates, _ = moe_lib.route(jnp.asarray(logits, jnp.float32), _moe())
  ws = {'wi_gate': rng.standard_normal((E, d, f)) / 4, 'wi_up': rng.standard_normal((E, d, f)) / 4,
        'wo': rng.standard_normal((E, f, d)) / 4}
  return x, idx, gates, {k: jnp.asarray(v, jnp.float32) for k, v in ws.items()}


def _ffn(x, ws, e):
  h = jax.nn.silu(x @ ws['wi_gate'][e]) * (x @ ws['wi_up'][e])
  return h @ ws['wo'][e]


@pytest.mark.parametrize('impl', ['ragged_dot', 'blocked', 'pallas'])
def test_dropless_equals_every_expert_on_every_token_weighted_by_the_router(impl):
  x, idx, gates, ws = _expert_inputs(skew=True)
  m = dataclass_replace(_moe(), gmm_impl=impl, gmm_block_rows=8)
  y = moe_dispatch.expert_ffn(x, idx, gates, ws, moe=m, sharder=Sharder(None, ()), platform='cpu')
  weight = np.einsum('bske,bsk->bse', jax.nn.one_hot(idx, E), gates)  # router weight of each expert, 0 if unchosen
  expected = sum(weight[..., e, None] * _ffn(x, ws, e) for e in range(E))
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_dropless_gradients_match_the_dense_reference():
  x, idx, gates, ws = _expert_inputs(seed=3)
  m = dataclass_replace(_moe(), gmm_impl='blocked', gmm_block_rows=8)

  def ours(x, ws):
    return jnp.sum(jnp.sin(moe_dispatch.expert_ffn(x, idx, gates, ws, moe=m, sharder=Sharder(None, ()),
                                                   platform='cpu')))

  def dense(x, ws):
    weight = jnp.einsum('bske,bsk->bse', jax.nn.one_hot(idx, E), gates)
    return jnp.sum(jnp.sin(sum(weight[..., e, None] * _ffn(x, ws, e) for e in range(E))))

  assert_trees_close(jax.grad(ours, argnums=(0, 1))(x, ws), jax.grad(dense, argnums=(0, 1))(x, ws), 'grads',
                     rtol=1e-5, atol=1e-5)


def test_capacity_path_drops_exactly_the_choices_past_capacity():
  x, idx, gates, ws = _expert_inputs(seed=4, skew=True)  # expert 0 is popular: its slots overflow
  m = dataclass_replace(_moe(), dispatch='capacity', capacity_factor=0.5)
  capacity = m.capacity(x.shape[1])
  y = moe_dispatch.expert_ffn(x, idx, gates, ws, moe=m, sharder=Sharder(None, ()), platform='cpu',
                              capacity=capacity)
  idx_np, gates_np = np.asarray(idx), np.asarray(gates)
  expected = np.zeros(x.shape, np.float32)
  dropped = 0
  for b in range(x.shape[0]):
    used = [0] * E
    for k in range(K):  # every first choice before any second choice
      for s in range(x.shape[1]):
        e = idx_np[b, s, k]
        if used[e] < capacity:
          used[e] += 1
          expected[b, s] += gates_np[b, s, k] * np.asarray(_ffn(x[b, s], ws, e))
        else:
          dropped += 1
  assert dropped > 0
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
  positions = moe_dispatch.capacity_positions(idx, E)
  assert int(jnp.sum(positions >= capacity)) == dropped


def dataclass_replace(obj, **changes):
  import dataclasses  # pylint: disable=g-import-not-at-top
  return dataclasses.replace(obj, **changes)


# --- balance losses against their formulas -------------------------------------------------------------------


def _probs_and_counts(trainer, params, micro_batch):
  """Per MoE layer: router probabilities [L, b, s, E] and routing counts per sequence [L, b, E], from the model."""
  apply = functools.partial(trainer.model.apply, mutable=['intermediates'])
  (_, aux), state = apply({'params': params}, micro_batch['inputs'], micro_batch['positions'],
                          micro_batch['segment_ids'])
  probs = state['intermediates']['layers']['moe']['router_probs'][0]
  top = jax.lax.top_k(probs, K)[1]
  counts = jax.nn.one_hot(top, E).sum((2, 3))
  return probs, counts, aux


@pytest.mark.parametrize('scope', ['sequence', 'global'])
def test_balance_loss_is_the_formula_over_its_groups(scope, init_params):
  cfg = moe_cfg(balance_scope=scope)
  trainer = trainer_for(cfg)
  b = jax.tree.map(jnp.asarray, batch())
  probs, counts, aux = jax.jit(functools.partial(_probs_and_counts, trainer))(init_params.params, b)
  if scope == 'sequence':
    f = counts / (SEQ * K)  # [L, b, E]
    p = probs.mean(2)
    expected = jnp.mean(E * jnp.sum(f * p, -1))  # mean over layers and sequences
  else:
    f = counts.sum(1) / (BATCH * SEQ * K)  # [L, E]
    p = probs.mean((1, 2))
    expected = jnp.mean(E * jnp.sum(f * p, -1))
  np.testing.assert_allclose(aux['moe_balance'], expected, rtol=1e-6)
  assert abs(float(expected) - 1.0) > 1e-4  # not trivially balanced


def test_micro_scope_pools_each_ranks_micro_batch_and_differs_from_global(init_params):
  _, micro_metrics = step(moe_cfg(dict(data=2), balance_scope='micro', micro_batches=2), init_params)
  # micro: groups of 16 / 2 micro-batches / 2 ranks = 4 sequences, rows j, j+2, ... of the batch
  trainer = trainer_for(moe_cfg())
  expected, all_probs, all_counts = [], [], []
  routing = jax.jit(functools.partial(_probs_and_counts, trainer))
  for mb in _micro(batch(), 2):
    probs, counts, _ = routing(init_params.params, mb)
    all_probs.append(probs)
    all_counts.append(counts)
    for g in range(2):  # the two ranks' halves of the micro-batch
      rows = slice(4 * g, 4 * g + 4)
      f = counts[:, rows].sum(1) / (4 * SEQ * K)
      expected.append(E * jnp.sum(f * probs[:, rows].mean((1, 2)), -1))
  np.testing.assert_allclose(micro_metrics['moe_balance'], np.mean(expected), rtol=1e-5)
  # The same routing pooled over the whole step (the global scope) gives another value.
  counts, probs = jnp.concatenate(all_counts, 1), jnp.concatenate(all_probs, 1)
  pooled = jnp.mean(E * jnp.sum(counts.sum(1) / (BATCH * SEQ * K) * probs.mean((1, 2)), -1))
  assert abs(float(micro_metrics['moe_balance']) - float(pooled)) > 1e-3


def _micro(b, n):
  return [{k: jnp.asarray(split_micro_batches(v, n)[j]) for k, v in b.items()} for j in range(n)]


# --- the step: meshes, micro-batches, exact and running forms ----------------------------------------------------


@pytest.fixture(scope='module')
def whole_batch_step(init_params):
  """One device, one micro-batch, global scope: every other global-scope variant must reproduce it."""
  return step(moe_cfg(), init_params)


def test_whole_batch_step_moves_experts_and_router(whole_batch_step):
  grads, metrics = whole_batch_step
  g = flat(grads)
  for name in ('router', 'wi_gate', 'wo'):
    assert max(np.abs(v).max() for k, v in g.items() if f"'{name}'" in k and 'moe' in k) > 1e-4, name
  assert float(metrics['aux_loss']) > 0
  counts = np.asarray(metrics['moe_counts'])  # [layers, E]: every token's k choices counted once
  np.testing.assert_array_equal(counts.sum(-1), BATCH * SEQ * K)
  np.testing.assert_allclose(metrics['moe_load'], counts / counts.sum(-1, keepdims=True), rtol=1e-6)
  np.testing.assert_allclose(metrics['moe_max_over_mean'], counts.max(-1) / counts.mean(-1), rtol=1e-6)
  assert np.all((metrics['moe_entropy'] > 0) & (metrics['moe_entropy'] <= np.log(E) + 1e-6))


MESHES = {
    'data8': dict(data=8),
    'data4_expert2': dict(data=4, expert=2),
    'fsdp2_expert4': dict(fsdp=2, expert=4),
    'data2_expert2_tensor2': dict(data=2, expert=2, tensor=2),
    'fsdp2_expert2_tensor2': dict(fsdp=2, expert=2, tensor=2),
}
DEFAULT_MESHES = ('fsdp2_expert4', 'data2_expert2_tensor2')  # the others run with -m slow


@pytest.mark.parametrize('mesh', [m if m in DEFAULT_MESHES else pytest.param(m, marks=pytest.mark.slow)
                                  for m in MESHES])
def test_global_balance_on_any_mesh_equals_one_device(mesh, init_params, whole_batch_step):
  grads, metrics = step(moe_cfg(MESHES[mesh]), init_params)
  assert_trees_close(grads, whole_batch_step[0], mesh)
  for key in ('loss', 'aux_loss', 'moe_balance', 'moe_counts'):
    np.testing.assert_allclose(metrics[key], whole_batch_step[1][key], rtol=RTOL, err_msg=key)


@pytest.mark.parametrize('micro_batches', [pytest.param(2, marks=pytest.mark.slow), 4])
def test_exact_global_balance_with_micro_batches_equals_one_batch(micro_batches, init_params, whole_batch_step):
  grads, metrics = step(moe_cfg(dict(data=2, expert=2, tensor=2), micro_batches=micro_batches,
                                balance_exact=True), init_params)
  assert_trees_close(grads, whole_batch_step[0], f'{micro_batches} micro-batches')
  np.testing.assert_allclose(metrics['moe_balance'], whole_batch_step[1]['moe_balance'], rtol=RTOL)


def test_running_global_balance_equals_a_plain_loop(init_params, whole_batch_step):
  n = 2
  cfg = moe_cfg(micro_batches=n, router_z_loss=0.0)
  grads, metrics = step(cfg, init_params)
  trainer = trainer_for(cfg)
  micro = _micro(batch(), n)
  tokens = float(batch()['weights'].sum())

  def loss(params):
    total, seen, balance_sum = 0.0, jnp.zeros((cfg.model.n_layers, E)), 0.0
    for mb in micro:
      probs, counts, _ = _probs_and_counts(trainer, params, mb)
      logits, _ = trainer.model.apply({'params': params}, mb['inputs'], mb['positions'], mb['segment_ids'])
      seen = seen + counts.sum(1)  # Megatron: counts of the micro-batches so far, this one included
      f = jax.lax.stop_gradient(seen / jnp.sum(seen, -1, keepdims=True))
      lbl = jnp.mean(E * jnp.sum(f * probs.mean((1, 2)), -1))  # this micro-batch's loss, mean over layers
      balance_sum = balance_sum + lbl / n
      total = total + token_losses(logits, mb['targets'], mb['weights'])['ce_sum'] / tokens
    return total + BALANCE_WEIGHT * balance_sum, balance_sum

  (_, expected_balance), expected_grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(init_params.params)
  np.testing.assert_allclose(metrics['moe_balance'], expected_balance, rtol=1e-5)
  assert_trees_close(grads, expected_grads, 'running form vs loop')
  # ... and it is not the exact global loss: early micro-batches see only part of the step's routing.
  assert abs(float(metrics['moe_balance']) - float(whole_batch_step[1]['moe_balance'])) > 1e-5


def test_capacity_path_is_the_same_on_an_expert_parallel_mesh(init_params):
  one_grads, one = step(moe_cfg(dispatch='capacity', capacity_factor=0.5), init_params)
  grads, many = step(moe_cfg(dict(data=2, expert=2, tensor=2), dispatch='capacity', capacity_factor=0.5),
                     init_params)
  assert float(one['moe_dropped'].sum()) > 0
  np.testing.assert_array_equal(many['moe_dropped'], one['moe_dropped'])
  assert_trees_close(grads, one_grads, 'capacity path, expert parallel')


# --- config -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('changes, field', [
    (dict(top_k=5), 'moe.top_k'),
    (dict(every=2), 'moe.every'),
    (dict(balance_scope='group'), 'moe.balance_group'),
    (dict(balance_scope='group', balance_group=3), 'moe.balance_group'),
    (dict(balance_group=4), 'moe.balance_group'),
    (dict(dispatch='sorted'), 'moe.dispatch'),
    (dict(num_experts=6), 'moe.num_experts'),
])
def test_bad_moe_config_names_the_field(changes, field):
  cfg = moe_cfg(dict(data=2, expert=4))
  cfg.moe.update(**changes)
  with pytest.raises(ValueError, match=f'config {field}'):
    config_lib.validate(cfg, num_devices=8)


def test_domain_expert_information_is_zero_for_shared_use_and_log_d_for_private_experts():
  from framework.models.moe_balance import domain_expert_information  # pylint: disable=g-import-not-at-top
  private = jnp.asarray(np.kron(np.eye(4), np.ones((1, 2))) * 7)  # domain d uses experts 2d, 2d+1 only
  shared = jnp.ones((4, 8)) * 3
  np.testing.assert_allclose(domain_expert_information(private), 2.0, rtol=1e-6)
  np.testing.assert_allclose(domain_expert_information(shared), 0.0, atol=1e-6)
  rng = np.random.default_rng(0)
  counts = rng.integers(0, 20, size=(4, 8)).astype(np.float64)
  joint = counts / counts.sum()
  outer = joint.sum(1, keepdims=True) * joint.sum(0, keepdims=True)
  expected = np.sum(joint * np.log2(np.where(joint > 0, joint, outer) / outer))
  np.testing.assert_allclose(domain_expert_information(jnp.asarray(counts)), expected, rtol=1e-5)


@pytest.mark.parametrize('mesh, n_devices', [(dict(data=2, expert=4), 8),
                                             pytest.param(dict(expert=2), 2, marks=pytest.mark.slow),
                                             pytest.param(dict(data=1), 1, marks=pytest.mark.slow)])
def test_moe_checkpoint_restores_onto_another_expert_split(mesh, n_devices, tmp_path):
  from framework import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  saved_cfg = moe_cfg(dict(data=2, expert=2, tensor=2))
  saved_cfg.checkpoint.update(async_save=False)
  trainer = trainer_for(saved_cfg)
  rng = np.random.default_rng(0)
  host = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype) if s.shape else np.asarray(3, s.dtype),
                      trainer.abstract_state)
  state = jax.device_put(host, trainer.state_shardings)
  expert_w = state.params['layers']['moe']['wi_gate']
  assert expert_w.addressable_shards[0].data.shape[1] == E // 2  # [layers, experts, d, f]: experts split 2-way
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path / 'ckpt'), saved_cfg.checkpoint)
  checkpointer.save(3, state, {'next_step': 3, 'seed': 0}, {}, force=True)
  checkpointer.close()

  cfg = moe_cfg(mesh)
  target = trainer_for(cfg, n_devices)
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path / 'ckpt'), cfg.checkpoint)
  try:
    restored, _ = checkpointer.restore(3, target.abstract_state)
  finally:
    checkpointer.close()
  assert_trees_close(jax.device_get(restored), host, 'restored', rtol=0, atol=0)
  w = restored.params['layers']['moe']['wi_gate']
  assert w.addressable_shards[0].data.shape[1] == E // mesh.get('expert', 1)


def test_expert_bias_changes_the_choice_not_the_weights():
  logits = jnp.asarray(np.random.default_rng(5).standard_normal((4, 6, E)), jnp.float32)
  m = _moe(router='sigmoid')
  bias = jnp.asarray([10.0, 0, 0, -10.0])  # expert 0 always chosen, expert 3 never
  idx, gates, _ = moe_lib.route(logits, m, bias)
  assert np.all(np.asarray(idx)[..., 0] == 0) and not np.any(np.asarray(idx) == 3)
  s = 1 / (1 + np.exp(-np.asarray(logits)))
  chosen = np.take_along_axis(s, np.asarray(idx), -1)
  np.testing.assert_allclose(gates, chosen / chosen.sum(-1, keepdims=True), rtol=1e-6)


@pytest.mark.slow
def test_loss_free_balancing_moves_biases_toward_even_load_and_nothing_else(init_params, whole_batch_step):
  rate = 0.01
  cfg = moe_cfg(bias_update_rate=rate)
  trainer = trainer_for(cfg)
  host = jax.device_get(trainer.init(jax.random.key(0)))
  bias_free = {k: v for k, v in flat(host.params).items() if 'expert_bias' not in k}
  assert bias_free.keys() == flat(init_params.params).keys()
  # The same start as the other tests, biases at zero: routing, loss and every other gradient are unchanged.
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: x if 'expert_bias' in jax.tree_util.keystr(p) else flat(init_params.params)[jax.tree_util.keystr(p)],
      host.params)
  host = host.replace(params=params)
  grads, metrics = step(cfg, host)
  g = flat(grads)
  counts = np.asarray(metrics['moe_counts'])  # [layers, E]
  np.testing.assert_allclose(-g["['layers']['moe']['expert_bias']"], rate * np.sign(counts.mean(-1, keepdims=True)
                                                                                    - counts), rtol=1e-6)
  expected = flat(whole_batch_step[0])
  for k, v in g.items():
    if 'expert_bias' not in k:
      np.testing.assert_allclose(v, expected[k], rtol=RTOL, atol=ATOL, err_msg=k)


@pytest.mark.slow
def test_extra_micro_term_is_the_micro_scope_loss_with_its_own_weight(init_params):
  _, micro = step(moe_cfg(dict(data=2), balance_scope='micro', micro_batches=2), init_params)
  _, both = step(moe_cfg(dict(data=2), balance_scope='global', micro_batches=2, balance_micro_weight=0.1,
                         balance_exact=True), init_params)
  np.testing.assert_allclose(both['moe_balance_micro'], micro['moe_balance'], rtol=1e-5)
  expected = BALANCE_WEIGHT * both['moe_balance'] + 0.1 * both['moe_balance_micro'] + 1e-2 * both['moe_router_z']
  np.testing.assert_allclose(both['aux_loss'], expected, rtol=1e-5)


def test_shared_experts_add_a_plain_swiglu_to_the_routed_output():
  from framework.models.layers import ModelConfig  # pylint: disable=g-import-not-at-top
  cfg = moe_cfg(shared_experts=2)
  m = MoEConfig.from_config(cfg, 1)
  layer = moe_lib.MoE(ModelConfig.from_config(cfg.model, m), Sharder(None, ()))
  x = jnp.asarray(np.random.default_rng(6).standard_normal((2, SEQ, 32)), jnp.float32)
  args = (jnp.zeros((E,)), jnp.float32(2 * SEQ * K))
  params = jax.jit(layer.init)(jax.random.key(1), x, *args)['params']
  params = jax.tree.map(lambda p: p.unbox() if hasattr(p, 'unbox') else p, params,
                        is_leaf=lambda p: hasattr(p, 'unbox'))
  y, _ = jax.jit(layer.apply)({'params': params}, x, *args)
  idx, gates, _ = moe_lib.route(x @ params['router'], m)
  routed = moe_dispatch.expert_ffn(x, idx, gates, {k: params[k] for k in ('wi_gate', 'wi_up', 'wo')}, moe=m,
                                   sharder=Sharder(None, ()), platform='cpu')
  s = params['shared']
  assert s['wi_gate'].shape == (32, 2 * 64)  # two experts' worth of hidden units (d_ff_expert = model.d_ff = 64)
  shared = (jax.nn.silu(x @ s['wi_gate']) * (x @ s['wi_up'])) @ s['wo']
  np.testing.assert_allclose(y, routed + shared, rtol=1e-5, atol=1e-6)


EVERY_2 = dict(n_layers=2, every=2, shared_experts=1, router='sigmoid', dispatch='capacity', capacity_factor=1.0)


def test_every_other_layer_is_an_moe():
  params = jax.eval_shape(trainer_for(moe_cfg(**EVERY_2)).init, jax.random.key(0)).params
  assert set(params['layers']) == {'dense', 'moe_block'}  # layer 0 dense, layer 1 MoE, stacked per group
  assert params['layers']['dense']['mlp']['wi_gate'].shape == (1, 1, 32, 64)  # [groups, dense layers, d, f]
  assert params['layers']['moe_block']['moe']['wi_gate'].shape == (1, E, 32, 64)  # [groups, experts, d, f]


@pytest.mark.slow
def test_every_other_layer_sigmoid_shared_capacity_variant_is_the_same_on_a_mesh():
  host = jax.device_get(trainer_for(moe_cfg(**EVERY_2)).init(jax.random.key(0)))
  grads, metrics = step(moe_cfg(**EVERY_2), host)
  mesh_grads, mesh_metrics = step(moe_cfg(dict(fsdp=2, expert=2, tensor=2), **EVERY_2), host)
  assert np.asarray(metrics['moe_counts']).shape == (1, E)
  assert_trees_close(mesh_grads, grads, 'every=2 variant on a mesh')
  np.testing.assert_array_equal(mesh_metrics['moe_dropped'], metrics['moe_dropped'])


@pytest.mark.slow  # the Pallas interpreter on CPU
def test_pallas_grouped_matmul_per_expert_shard_equals_one_device(init_params, whole_batch_step):
  grads, metrics = step(moe_cfg(dict(data=2, expert=2, tensor=2), gmm_impl='pallas'), init_params)
  assert_trees_close(grads, whole_batch_step[0], 'pallas grouped matmul under shard_map')
  np.testing.assert_allclose(metrics['loss'], whole_batch_step[1]['loss'], rtol=RTOL)
