"""colabs/02_sharding.ipynb runs top to bottom in a fresh kernel (8 fake CPU devices), and what it reports holds.

The notebook asserts its claims in its own cells: every parameter's PartitionSpec is what the config's axis rules
say, every device holds the block of each parameter the mesh implies, and one training step on each of three
meshes gives the loss and the updated parameters of the same step on one device. Here its reported figures are
checked against what this process works out for itself: the mesh sizes from framework.mesh, the specs from a
hand-written table of the default rules (and logical_to_spec), the blocks and each device's share of the
parameters from the shapes, and the step's loss and gradient norm from the model's logits with a cross-entropy
and z-loss written out here.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import lm_tiny
from framework import data as data_lib
from framework import mesh as mesh_lib
from framework.mesh import Sharder
from framework.models.layers import ModelConfig
from framework.models.transformer import Transformer
from notebook_runner import run_notebook

# The notebook's three meshes as it builds them (data=-1 fills) and what they must resolve to on 8 devices.
MESHES = {
    'data8': (dict(data=-1), dict(data=8, fsdp=1, expert=1, tensor=1)),
    'fsdp4_data2': (dict(data=-1, fsdp=4), dict(data=2, fsdp=4, expert=1, tensor=1)),
    'fsdp2_tensor2_data2': (dict(data=-1, fsdp=2, tensor=2), dict(data=2, fsdp=2, expert=1, tensor=2)),
}
# The default rules for parameter names written out by hand (mesh axis or None), so the expected layout does not
# come from the code under test.
PARAM_RULES = {'vocab': 'tensor', 'embed': 'fsdp', 'heads': 'tensor', 'kv_heads': 'tensor', 'mlp': 'tensor',
               'layers': None, 'head_dim': None}
# f32 at 'highest' matmul precision (conftest, and the notebook sets the same): the meshes and this process sum the
# same terms in other orders, which moves losses and gradient norms by ~1e-7 relative.
RTOL = 1e-5


@pytest.fixture(scope='module')
def result() -> dict:
  return run_notebook('02_sharding.ipynb')


@pytest.fixture(scope='module')
def cfg(result):
  """The notebook's config, rebuilt here from lm_tiny and the overrides it reports."""
  cfg = lm_tiny.get_config()
  for section, values in result['config'].items():
    cfg[section].update(**values)
  cfg.seed = result['seed']
  return cfg


@pytest.fixture(scope='module')
def model_and_names(cfg):
  model = Transformer(ModelConfig.from_config(cfg.model), Sharder(None, tuple(cfg.mesh.axis_rules)))
  dummy = jnp.zeros((1, cfg.data.seq_len), jnp.int32)
  boxed = jax.eval_shape(model.init, jax.random.key(0), dummy, dummy, dummy)['params']
  specs = nn.get_partition_spec(boxed)
  names = {_path(p): list(s) for p, s in jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, P))}
  shapes = {_path(p): list(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(nn.meta.unbox(boxed))}
  return model, names, shapes


def _path(path) -> str:
  return '/'.join(str(getattr(k, 'key', k)) for k in path)


def _json_spec(spec, ndim) -> list:
  entries = list(spec) + [None] * (ndim - len(spec))
  return [e if e is None or isinstance(e, str) else list(e) for e in entries]


def test_runs_on_8_fake_cpu_devices_with_the_default_rules(result):
  assert result['num_devices'] == 8 and result['platform'] == 'cpu' and result['backend'] == 'cpu'
  assert result['axis_rules'] == [[n, _json_spec([a], 1)[0]] for n, a in mesh_lib.DEFAULT_AXIS_RULES]
  assert result['_plots'] == 1  # the per-device share bar chart, saved under build/notebook_plots/


def test_meshes_resolve_as_framework_mesh_says(result, cfg):
  assert set(result['meshes']) == set(MESHES)
  for name, (asked, resolved) in MESHES.items():
    mesh_cfg = cfg.mesh.copy_and_resolve_references()
    mesh_cfg.update(**asked)
    assert mesh_lib.mesh_sizes(mesh_cfg, 8) == resolved
    assert result['meshes'][name]['sizes'] == resolved, name


def test_specs_follow_the_axis_rules(result, model_and_names):
  _, names, shapes = model_and_names
  assert result['logical_names'] == names
  assert result['shapes'] == shapes
  assert names['embedding'] == ['vocab', 'embed']  # the parameters the notebook draws
  assert names['layers/mlp/wi_gate'] == ['layers', 'embed', 'mlp']
  for mesh_name, reported in result['meshes'].items():
    assert set(reported['specs']) == set(names), mesh_name
    for param, logical in names.items():
      by_hand = [PARAM_RULES[n] for n in logical]
      assert len({a for a in by_hand if a}) == len([a for a in by_hand if a])  # no mesh axis twice
      assert reported['specs'][param] == by_hand, (mesh_name, param)
      assert _json_spec(mesh_lib.logical_to_spec(logical, mesh_lib.DEFAULT_AXIS_RULES), len(logical)) == by_hand
  assert result['meshes']['data8']['specs']['embedding'] == ['tensor', 'fsdp']


def test_each_device_holds_the_block_the_mesh_implies(result, model_and_names):
  _, names, shapes = model_and_names
  for mesh_name, (_, sizes) in MESHES.items():
    reported = result['meshes'][mesh_name]
    held = total = 0
    for param, shape in shapes.items():
      block = [dim // (sizes[PARAM_RULES[n]] if PARAM_RULES[n] else 1) for dim, n in zip(shape, names[param])]
      assert reported['blocks'][param] == block, (mesh_name, param)
      held, total = held + math.prod(block), total + math.prod(shape)  # all f32: elements stand for bytes
    assert reported['fraction'] == pytest.approx(held / total, rel=1e-12), mesh_name
  d = shapes['embedding'][1]
  assert result['meshes']['fsdp4_data2']['blocks']['embedding'] == [shapes['embedding'][0], d // 4]
  assert result['meshes']['data8']['fraction'] == 1.0
  assert result['meshes']['fsdp4_data2']['fraction'] == 0.25
  assert 0.25 < result['meshes']['fsdp2_tensor2_data2']['fraction'] < 0.26  # the norms' scales split only in 2


def test_every_mesh_computes_the_one_device_step(result, cfg, model_and_names):
  model = model_and_names[0]
  train_stream, _ = data_lib.load_splits(cfg.data)
  batch = data_lib.batch_for_step(train_stream, 0, seed=cfg.seed, global_batch=cfg.train.batch_size,
                                  seq_len=cfg.data.seq_len)
  assert int(batch['inputs'].sum()) == result['batch_inputs_sum']  # the same batch as the notebook's
  dummy = jnp.zeros((1, cfg.data.seq_len), jnp.int32)
  params = jax.jit(lambda key: nn.meta.unbox(model.init(key, dummy, dummy, dummy)['params']))(
      jax.random.key(cfg.seed))

  def objective(params):  # the step's loss written out: mean token cross-entropy + z_loss x mean logsumexp^2
    logits, _ = model.apply({'params': params}, batch['inputs'], batch['positions'], batch['segment_ids'])
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target = jnp.take_along_axis(logits, batch['targets'][..., None], axis=-1)[..., 0]
    w = batch['weights']
    ce = jnp.sum((log_z - target) * w) / jnp.sum(w)
    return ce + cfg.train.z_loss * jnp.sum(log_z ** 2 * w) / jnp.sum(w), ce

  (_, ce), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(params)
  grad_norm = float(np.sqrt(sum(np.sum(np.square(np.asarray(g, np.float64))) for g in jax.tree.leaves(grads))))
  reported = [('reference', result['reference'])] + list(result['meshes'].items())
  for name, r in reported:
    np.testing.assert_allclose(r['loss'], float(ce), rtol=RTOL, err_msg=name)
    np.testing.assert_allclose(r['grad_norm'], grad_norm, rtol=RTOL, err_msg=name)
  # The step moved parameters by up to O(1) (SGD, lr 1), and every mesh landed within rounding of one device.
  assert result['reference']['max_update'] > 1e-3
  for name, r in result['meshes'].items():
    assert r['max_diff'] < 1e-5, name
