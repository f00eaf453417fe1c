"""Parameters, optimizer state and batches are really sharded as the config's logical-axis rules say.

For three meshes on the 8 fake CPU devices, the arrays `Trainer.init` returns are compared with shardings
derived here, independently, from each parameter's logical names (and a hand-written table for the key ones),
and their per-device shards are checked to be really split. Plus unit cases of `mesh.logical_to_spec`.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from framework import config as config_lib
from framework import mesh as mesh_lib
from framework.mesh import Sharder, make_sharder, spread_over
from framework.models.layers import ModelConfig
from framework.models.transformer import Transformer
from framework.train import Trainer

MESHES = {
    'data8': dict(data=8),
    'data2_fsdp4': dict(data=2, fsdp=4),
    'data2_fsdp2_tensor2': dict(data=2, fsdp=2, tensor=2),
}

# The default rules written out by hand for parameter names (mesh axis or None), so the expected layout does
# not come from the code under test.
PARAM_RULES = {'vocab': 'tensor', 'embed': 'fsdp', 'heads': 'tensor', 'kv_heads': 'tensor', 'mlp': 'tensor',
               'layers': None, 'head_dim': None}

# Logical names of the key parameters, as the model is meant to declare them (scan prepends 'layers').
KEY_PARAMS = {
    'embedding': ('vocab', 'embed'),
    'head': ('embed', 'vocab'),
    'layers/attn/wq': ('layers', 'embed', 'heads', 'head_dim'),
    'layers/attn/wk': ('layers', 'embed', 'kv_heads', 'head_dim'),
    'layers/attn/wv': ('layers', 'embed', 'kv_heads', 'head_dim'),
    'layers/attn/wo': ('layers', 'heads', 'head_dim', 'embed'),
    'layers/mlp/wi_gate': ('layers', 'embed', 'mlp'),
    'layers/mlp/wi_up': ('layers', 'embed', 'mlp'),
    'layers/mlp/wo': ('layers', 'mlp', 'embed'),
    'layers/attn_norm/scale': ('layers', 'embed'),
    'layers/mlp_norm/scale': ('layers', 'embed'),
    'final_norm/scale': ('embed',),
}


def tiny_config(**mesh):
  cfg = config_lib.defaults()
  cfg.model.update(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=16, vocab_size=512)
  cfg.data.seq_len = 16
  cfg.train.update(batch_size=16, steps=10)
  cfg.optim.warmup_steps = 2
  cfg.mesh.update(**mesh)
  return cfg


def path_str(path) -> str:
  return '/'.join(str(getattr(p, 'key', p)) for p in path)


def flat(tree) -> dict:
  return {path_str(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope='module')
def logical_names() -> dict:
  """Each parameter's logical axis names, read from the flax metadata of an abstract (shapes-only) init."""
  cfg = tiny_config()
  model = Transformer(ModelConfig.from_config(cfg.model), Sharder(None, ()))
  dummy = jnp.zeros((1, 16), jnp.int32)
  boxed = jax.eval_shape(model.init, jax.random.key(0), dummy, dummy, dummy)['params']
  specs = nn.get_partition_spec(boxed)
  return {path_str(path): tuple(spec)
          for path, spec in jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, P))}


@pytest.fixture(scope='module')
def single_device_params():
  cfg = tiny_config(data=1)
  trainer = Trainer(cfg, make_sharder(cfg, jax.devices()[:1]))
  return jax.device_get(trainer.init(jax.random.key(0)).params)


@pytest.fixture(scope='module', params=sorted(MESHES))
def built(request):
  cfg = tiny_config(**MESHES[request.param])
  trainer = Trainer(cfg, make_sharder(cfg))
  return request.param, trainer, trainer.init(jax.random.key(0))


def expected_spec(names) -> P:
  axes = [PARAM_RULES[n] for n in names]
  used = [a for a in axes if a is not None]
  assert len(used) == len(set(used)), f'{names} would use a mesh axis twice under the default rules'
  return P(*axes)


def test_key_params_carry_their_logical_names(logical_names):
  # Without names every array would be replicated, and the sharding checks below would pass vacuously on data8.
  for name, names in KEY_PARAMS.items():
    assert logical_names[name] == names, name
  assert set(logical_names) == set(KEY_PARAMS)  # the tiny model has exactly these parameters


def test_param_shardings_follow_rules(built, logical_names):
  mesh_name, trainer, state = built
  params = flat(state.params)
  assert set(params) == set(logical_names)
  for name, x in params.items():
    expected = NamedSharding(trainer.sharder.mesh, expected_spec(logical_names[name]))
    assert x.sharding.is_equivalent_to(expected, x.ndim), (mesh_name, name, x.sharding.spec, expected.spec)


def _shard_shape(shape, spec: P, mesh_shape: dict) -> tuple:
  """Each dim divided by the size of the mesh axis it is split over (expected_spec names one axis or None)."""
  assert len(spec) == len(shape)
  return tuple(dim // (mesh_shape[axis] if axis else 1) for dim, axis in zip(shape, spec))


def test_shards_are_really_split(built, logical_names):
  mesh_name, trainer, state = built
  mesh_shape = dict(trainer.sharder.mesh.shape)
  params = flat(state.params)
  split_somewhere = False
  for name, x in params.items():
    want = _shard_shape(x.shape, expected_spec(logical_names[name]), mesh_shape)
    shapes = {s.data.shape for s in x.addressable_shards}
    assert shapes == {want}, (mesh_name, name, x.shape, shapes, want)
    # As many distinct blocks as the shard shape implies: the devices hold different parts, not copies.
    n_blocks = math.prod(g // s for g, s in zip(x.shape, want))
    assert len({str(s.index) for s in x.addressable_shards}) == n_blocks, (mesh_name, name)
    split_somewhere |= want != x.shape
  # Literal shard shapes for the key parameters (global embedding [512, 64], wq [2, 64, 4, 16]).
  literal = {
      'data8': {'embedding': (512, 64), 'layers/attn/wq': (2, 64, 4, 16), 'layers/mlp/wo': (2, 128, 64)},
      'data2_fsdp4': {'embedding': (512, 16), 'layers/attn/wq': (2, 16, 4, 16), 'layers/mlp/wo': (2, 128, 16)},
      'data2_fsdp2_tensor2': {'embedding': (256, 32), 'layers/attn/wq': (2, 32, 2, 16),
                              'layers/mlp/wo': (2, 64, 32)},
  }[mesh_name]
  for name, shape in literal.items():
    assert params[name].addressable_shards[0].data.shape == shape, (mesh_name, name)
  assert split_somewhere == (mesh_name != 'data8')


def _adam_state(state):
  adam = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
          if isinstance(s, optax.ScaleByAdamState)]
  assert len(adam) == 1
  return adam[0]


def _elements(shard) -> int:
  return math.prod(shard.data.shape)


def test_optimizer_moments_split_further_over_the_data_axes(built):
  """ZeRO-1 (optim.shard_state_over_data, the default): each moment is split as its parameter is, and over the
  batch's mesh axes the parameter does not use, so every device holds 1/N of the replicated parameters' moments."""
  mesh_name, trainer, state = built
  mesh_shape = dict(trainer.sharder.mesh.shape)
  batch_axes = ('data', 'fsdp', 'expert')  # the default 'batch' rule, written out
  adam = _adam_state(state)
  params = flat(state.params)
  for moments in (adam.mu, adam.nu):
    moments = flat(moments)
    assert set(moments) == set(params)
    for name, m in moments.items():
      p = params[name]
      assert m.shape == p.shape
      used = {a for entry in p.sharding.spec for a in ((entry,) if isinstance(entry, str) else entry or ())}
      extra = math.prod(mesh_shape[a] for a in batch_axes if a not in used)
      assert {_elements(s) for s in m.addressable_shards} == {_elements(p.addressable_shards[0]) // extra}, (
          mesh_name, name, m.sharding.spec, p.sharding.spec)
      # Distinct blocks, not copies: the split is real.
      blocks = len({str(s.index) for s in p.addressable_shards}) * extra
      assert len({str(s.index) for s in m.addressable_shards}) == blocks, (mesh_name, name)
  assert adam.count.sharding.is_fully_replicated
  assert state.step.sharding.is_fully_replicated


def test_optimizer_moments_sharded_like_params_when_asked():
  cfg = tiny_config(data=2, fsdp=4)
  cfg.optim.shard_state_over_data = False
  trainer = Trainer(cfg, make_sharder(cfg))
  state = trainer.init(jax.random.key(0))
  params = flat(state.params)
  for moments in (_adam_state(state).mu, _adam_state(state).nu):
    for name, m in flat(moments).items():
      assert m.sharding.is_equivalent_to(params[name].sharding, m.ndim), name


def test_init_is_the_same_on_every_mesh(built, single_device_params):
  # A run resharded onto another mesh must start from (and restore to) the same numbers.
  mesh_name, _, state = built
  host = jax.device_get(state.params)
  for name, value in flat(host).items():
    np.testing.assert_array_equal(value, flat(single_device_params)[name], err_msg=f'{mesh_name} {name}')


def test_batch_is_split_over_the_batch_axes(built):
  mesh_name, trainer, _ = built
  rng = np.random.default_rng(0)
  batch = {k: rng.integers(0, 100, size=(16, 16)).astype(np.float32 if k == 'weights' else np.int32)
           for k in ('inputs', 'targets', 'segment_ids', 'positions', 'weights')}
  device_batch = trainer.device_batch(batch)
  mesh_shape = trainer.sharder.mesh.shape
  rows = 16 // (mesh_shape['data'] * mesh_shape['fsdp'] * mesh_shape['expert'])
  for key, x in device_batch.items():
    assert {s.data.shape for s in x.addressable_shards} == {(rows, 16)}, (mesh_name, key)
    np.testing.assert_array_equal(np.asarray(x), batch[key])


# --- logical_to_spec -----------------------------------------------------------------------------------------

RULES = (
    ('batch', ('data', 'fsdp')),
    ('embed', 'fsdp'),
    ('heads', 'tensor'),
    ('mlp', 'tensor'),
    ('layers', None),
    ('embed', 'data'),  # a later duplicate rule: the first one wins
)


@pytest.mark.parametrize('names,expected', [
    (('batch', 'embed'), P(('data', 'fsdp'), None)),  # fsdp is taken by batch first
    (('embed', 'batch'), P('fsdp', 'data')),  # ... and the other way round
    (('embed', 'heads'), P('fsdp', 'tensor')),
    (('heads', 'mlp'), P('tensor', None)),  # a mesh axis at most once per array
    (('layers', 'embed', 'heads', 'head_dim'), P(None, 'fsdp', 'tensor', None)),  # no rule for head_dim
    (('unknown', None, 'embed'), P(None, None, 'fsdp')),  # unknown names and None stay replicated
    ((), P()),
    (None, P()),
])
def test_logical_to_spec(names, expected):
  assert mesh_lib.logical_to_spec(names, RULES) == expected


def test_default_rules_map_activations_and_params_apart():
  rules = mesh_lib.DEFAULT_AXIS_RULES
  assert mesh_lib.logical_to_spec(('batch', 'seq', 'act_embed'), rules) == P(('data', 'fsdp', 'expert'), None,
                                                                             None)
  assert mesh_lib.logical_to_spec(('vocab', 'embed'), rules) == P('tensor', 'fsdp')


def test_spread_over_picks_the_first_dim_that_divides_and_keeps_existing_splits():
  mesh = make_sharder(tiny_config(data=4, fsdp=2)).mesh
  base = NamedSharding(mesh, P(None, 'fsdp'))
  assert spread_over(base, (6, 16), ('data', 'fsdp')).spec == P(None, ('fsdp', 'data'))  # 6 % 4: skip dim 0
  assert spread_over(base, (8, 16), ('data', 'fsdp')).spec == P('data', 'fsdp')
  assert spread_over(base, (6, 6), ('data',)) is base  # nothing divides: unchanged
  assert spread_over(base, (8, 16), ('fsdp',)) is base  # already uses every axis asked for
