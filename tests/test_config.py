"""Config validation: every bad field fails once, up front, with a ValueError that names it; shipped configs pass.

Also the shipped model sizes (counted from abstract shapes, nothing allocated) and the launcher refusing a
mistyped override.
"""
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import pytest

from framework import config as config_lib
from framework import loop
from framework import train as train_lib
from framework.mesh import Sharder
from framework.models.layers import ModelConfig
from framework.models.transformer import Transformer
from configs import lm_1b, lm_small, lm_tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny():
  cfg = config_lib.defaults()
  cfg.model.update(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=16)
  cfg.data.seq_len = 16
  cfg.train.update(batch_size=16, steps=10)
  cfg.optim.warmup_steps = 2
  return cfg


def with_extra_key(section, key, value):
  cfg = tiny()
  cfg[section].unlock()
  cfg[section][key] = value
  cfg[section].lock()
  return cfg


def from_dict(**changes):
  """A config rebuilt from plain dicts, so values of the wrong type get past ConfigDict's own type checks."""
  d = tiny().to_dict()
  for dotted, value in changes.items():
    if '.' not in dotted:
      d[dotted] = value
      continue
    section, key = dotted.split('.')
    d[section][key] = value
  return ml_collections.ConfigDict(d)


def test_tiny_base_is_valid():
  # Every case below changes one field of this config, so each failure is that field's.
  assert config_lib.validate(tiny(), num_devices=8) == {'data': 8, 'fsdp': 1, 'expert': 1, 'tensor': 1}


def _set(**changes):
  cfg = tiny()
  for dotted, value in changes.items():
    if '.' not in dotted:
      cfg[dotted] = value
      continue
    section, key = dotted.split('.')
    cfg[section][key] = value
  return cfg


# (config, the field the message must name, a phrase of the reason)
BAD = {
    'mesh_product': (lambda: _set(**{'mesh.data': 3}), 'config mesh:', 'data=3'),
    'two_fill_axes': (lambda: _set(**{'mesh.data': -1, 'mesh.fsdp': -1}), 'mesh.fsdp', 'only one axis'),
    'batch_vs_dp': (lambda: _set(**{'train.batch_size': 12}), 'train.batch_size', 'not divisible'),
    'batch_vs_micro': (lambda: _set(**{'train.micro_batches': 4}), 'train.batch_size', 'micro_batches'),
    'device_batch_vs_batch': (lambda: _set(**{'train.device_batch': 3}), 'train.device_batch', 'do not divide'),
    'device_batch_and_micro': (lambda: _set(**{'train.device_batch': 1, 'train.micro_batches': 4}),
                               'train.micro_batches', 'set only one'),
    'heads_vs_tensor': (lambda: _set(**{'model.n_heads': 6, 'model.n_kv_heads': 2, 'model.head_dim': 16,
                                        'mesh.data': 2, 'mesh.tensor': 4, 'train.batch_size': 2}),
                        'model.n_heads', 'tensor'),
    'kv_heads': (lambda: _set(**{'model.n_kv_heads': 3}), 'model.n_kv_heads', 'must divide'),
    'attention_impl': (lambda: _set(**{'model.attention_impl': 'flash'}), 'model.attention_impl', 'not one of'),
    'cudnn_on_cpu': (lambda: _set(**{'model.attention_impl': 'cudnn'}), 'model.attention_impl', 'GPU'),
    'seq_len': (lambda: _set(**{'data.seq_len': 32}), 'data.seq_len', 'max_seq_len'),
    'missing_file': (lambda: _set(**{'data.source': 'text', 'data.path': '/nonexistent/dir/*.txt'}), 'data.path',
                     'no file matches'),
    'unknown_key': (lambda: with_extra_key('train', 'bach_size', 3), 'train.bach_size', 'unknown config key'),
    'unknown_section': (lambda: _set_section('trian'), 'trian', 'unknown config key'),
    'wrong_type_str': (lambda: from_dict(**{'train.steps': 'ten'}), 'train.steps', 'integer'),
    'wrong_type_str_float_field': (lambda: from_dict(**{'optim.lr': 'fast'}), 'optim.lr', 'number'),
    'axis_rule_typo': (lambda: _set(**{'mesh.axis_rules': (('batch', 'data'), ('head', 'tensor'))}),
                       'mesh.axis_rules', "did you mean 'heads'"),
    'axis_rule_unknown': (lambda: _set(**{'mesh.axis_rules': (('batch', 'data'), ('widgets', 'tensor'))}),
                          'mesh.axis_rules', 'no model uses'),
    'axis_rule_mesh_axis': (lambda: _set(**{'mesh.axis_rules': (('batch', 'dp'),)}), 'mesh.axis_rules', "'dp'"),
    'negative_seed': (lambda: _set(seed=-1), 'config seed', 'out of range'),
    'huge_seed': (lambda: _set(seed=2**40), 'config seed', 'out of range'),
    'float_seed': (lambda: from_dict(seed=1.5), 'config seed', 'integer'),
    'integral_float_seed': (lambda: from_dict(seed=2.0), 'config seed', 'integer'),
    'negative_grad_clip': (lambda: _set(**{'optim.grad_clip': -1.0}), 'optim.grad_clip', '>= 0'),
    'zero_eps': (lambda: _set(**{'optim.eps': 0.0}), 'optim.eps', '> 0'),
    'wrong_type_float': (lambda: from_dict(**{'train.batch_size': 16.5}), 'train.batch_size', 'integer'),
    'wrong_type_bool': (lambda: from_dict(**{'model.tie_embeddings': 'yes'}), 'model.tie_embeddings', 'True or False'),
    'remat_policy': (lambda: _set(**{'model.remat_policy': 'some'}), 'model.remat_policy', 'not one of'),
    'negative_z_loss': (lambda: _set(**{'train.z_loss': -1.0}), 'train.z_loss', '>= 0'),
    'negative_warmup': (lambda: _set(**{'optim.warmup_steps': -1}), 'optim.warmup_steps', '>= 0'),
}


def _set_section(name):
  cfg = tiny()
  cfg.unlock()
  cfg[name] = ml_collections.ConfigDict({'steps': 1})
  return cfg


@pytest.mark.parametrize('case', sorted(BAD))
def test_bad_field_raises_one_clear_error(case):
  make, field, reason = BAD[case]
  with pytest.raises(ValueError) as info:
    config_lib.validate(make(), num_devices=8)
  message = str(info.value)
  assert field in message and reason in message, message
  assert '\n' not in message  # one error, one line


@pytest.mark.parametrize('case', ['mesh_product', 'unknown_key', 'missing_file', 'heads_vs_tensor'])
def test_train_fails_before_building_anything(case, tmp_path, monkeypatch):
  make, field, _ = BAD[case]

  def no_trainer(*args, **kwargs):
    raise AssertionError('a Trainer was built (and would compile) before the config was validated')

  monkeypatch.setattr(loop, 'Trainer', no_trainer)
  workdir = tmp_path / 'run'
  with pytest.raises(ValueError, match=field.replace('.', r'\.')):
    loop.train(make(), str(workdir))
  assert not workdir.exists()  # nothing written either


@pytest.mark.parametrize('module', [lm_tiny, lm_small, lm_1b], ids=lambda m: m.__name__.split('.')[-1])
@pytest.mark.parametrize('backend', ['cpu', 'gpu'])
def test_shipped_configs_validate(module, backend):
  sizes = config_lib.validate(module.get_config(), num_devices=8, backend=backend)
  assert sizes['data'] * sizes['fsdp'] * sizes['expert'] * sizes['tensor'] == 8


def _param_count(cfg) -> int:
  model = Transformer(ModelConfig.from_config(cfg.model), Sharder(None, ()))
  dummy = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  params = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), dummy, dummy, dummy)['params'])
  return sum(x.size for x in jax.tree.leaves(params))


def test_shipped_model_sizes():
  tiny_n, small_n, big_n = (_param_count(m.get_config()) for m in (lm_tiny, lm_small, lm_1b))
  assert 2e6 <= tiny_n <= 4e6, tiny_n  # docstring: ~3M
  assert 10e6 <= small_n <= 30e6, small_n  # docstring: ~26M
  assert 0.9e9 <= big_n <= 1.3e9, big_n  # docstring: ~1.1B
  # Hand count for lm_small: embedding + head 2 x 512 x 512, 6 layers of 4 x 512^2 attention + 3 x 512 x 2048
  # MLP + 2 x 512 norm scales, and a final norm.
  assert small_n == 2 * 512 * 512 + 6 * (4 * 512 * 512 + 3 * 512 * 2048 + 2 * 512) + 512


def test_launcher_refuses_unknown_override(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env['JAX_PLATFORMS'] = 'cpu'
  proc = subprocess.run(
      [sys.executable, '-m', 'launch.train', '--config=configs/lm_tiny.py', f'--workdir={tmp_path / "run"}',
       '--config.train.bach_size=3'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert 'bach_size' in proc.stderr
  assert not (tmp_path / 'run').exists()


def test_odd_head_dim_is_refused_up_front():
  with pytest.raises(ValueError, match='model.head_dim'):
    config_lib.validate(_set(**{'model.head_dim': 15}), num_devices=8)


@pytest.mark.parametrize('devices, mesh, micro', [(8, {'data': 2, 'fsdp': 2, 'tensor': 2}, 4),
                                                  (4, {'data': 1, 'fsdp': 2, 'tensor': 2}, 8),
                                                  (8, {'data': 8}, 2), (1, {'data': 1}, 16)])
def test_device_batch_sets_the_micro_batch_count_from_the_mesh(devices, mesh, micro):
  """batch 16 at 1 row per batch shard per micro-batch: 16 / (data x fsdp) micro-batches."""
  cfg = _set(**{'train.device_batch': 1, **{f'mesh.{k}': v for k, v in mesh.items()}})
  resolved, note = train_lib.resolve_micro_batches(cfg, devices)
  assert resolved.train.micro_batches == micro and cfg.train.micro_batches == 1
  assert f'train.micro_batches = {micro}:' in note
  config_lib.validate(resolved, num_devices=devices)
  with pytest.raises(ValueError, match='train.micro_batches'):  # unresolved, the count disagrees
    config_lib.validate(cfg, num_devices=devices)
  unset, note = train_lib.resolve_micro_batches(_set(**{f'mesh.{k}': v for k, v in mesh.items()}), devices)
  assert unset.train.micro_batches == 1 and note is None
