"""Model and optimizer building blocks against references written here.

The xla attention front door against a naive per-head softmax loop (causal, GQA, packed segments); RoPE's norm
preservation and relative-position invariance; the Pallas front door against xla for a whole tiny model, on one
device and through the shard_map path on a 2x2 mesh; learning-rate schedules at hand-computed points; and the
weight-decay mask that spares norm scales.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from framework import config as config_lib
from framework import optim
from framework.corpus import PackedStream
from framework.data import batch_for_step
from framework.mesh import Sharder, make_sharder
from framework.models import attention as attention_lib
from framework.models.layers import ModelConfig, rope
from framework.models.transformer import Transformer
from framework.train import Trainer, token_losses

# f32 throughout with 'highest' matmul precision (conftest): the implementations differ only in summation
# order, which moves O(1) values by ~1e-6.
ATOL = 1e-5
RTOL = 1e-5


# --- attention -----------------------------------------------------------------------------------------------


def naive_attention(q, k, v, segment_ids=None, causal=True):
  """One (batch, head, query) at a time: softmax over the keys it may see, in float64."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  b, s, h, d = q.shape
  t, kv = k.shape[1], k.shape[2]
  group = h // kv
  out = np.zeros((b, s, h, d))
  for bi in range(b):
    for hi in range(h):
      kvi = hi // group  # query head h reads kv head h // (h / kv)
      for i in range(s):
        visible = [j for j in range(t)
                   if (not causal or j <= i)
                   and (segment_ids is None or segment_ids[bi, i] == segment_ids[bi, j])]
        if not visible:
          continue  # stays zero
        scores = np.array([q[bi, i, hi] @ k[bi, j, kvi] for j in visible]) / math.sqrt(d)
        p = np.exp(scores - scores.max())
        p /= p.sum()
        out[bi, i, hi] = sum(pj * v[bi, j, kvi] for pj, j in zip(p, visible))
  return out


def _qkv(seed, b=2, s=12, h=4, kv=2, d=8):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(b, s, h, d)).astype(np.float32)
  k = rng.normal(size=(b, s, kv, d)).astype(np.float32)
  v = rng.normal(size=(b, s, kv, d)).astype(np.float32)
  return q, k, v


@pytest.mark.parametrize('kv', [4, 2, 1])  # MHA, GQA, MQA
@pytest.mark.parametrize('with_segments', [False, True])
def test_xla_attention_matches_naive(kv, with_segments):
  q, k, v = _qkv(kv, kv=kv)
  # Three packed documents per row with different boundaries per row.
  seg = np.array([[1] * 3 + [2] * 5 + [3] * 4, [1] * 7 + [2] * 1 + [3] * 4], np.int32) if with_segments else None
  got = attention_lib.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                segment_ids=None if seg is None else jnp.asarray(seg), impl='xla')
  np.testing.assert_allclose(np.asarray(got), naive_attention(q, k, v, seg), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize('block_q', [5, 4, 12])  # uneven last block, even blocks, one block
@pytest.mark.parametrize('kv', [4, 1])
def test_causal_query_blocks_match_naive(block_q, kv):
  q, k, v = _qkv(11, kv=kv)
  seg = np.array([[1] * 3 + [2] * 5 + [3] * 4, [1] * 7 + [2] * 1 + [3] * 4], np.int32)
  got = attention_lib.xla_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), segment_ids=jnp.asarray(seg),
                                    block_q=block_q)
  np.testing.assert_allclose(np.asarray(got), naive_attention(q, k, v, seg), atol=ATOL, rtol=RTOL)


def test_causal_query_blocks_gradients_match_a_dense_masked_softmax():
  """The blocked forward's autodiff against a one-matrix softmax written here, differentiated by JAX."""
  q, k, v = (jnp.asarray(a) for a in _qkv(12, s=20, kv=2))
  seg = jnp.asarray(np.array([[1] * 9 + [2] * 11, [1] * 20], np.int32))
  cotangent = jnp.asarray(np.random.default_rng(0).normal(size=q.shape).astype(np.float32))

  def dense_reference(q, k, v):
    b, s, h, d = q.shape
    kk, vv = (jnp.repeat(a, h // a.shape[2], axis=2) for a in (k, v))
    scores = jnp.einsum('bshd,bthd->bhst', q, kk) / math.sqrt(d)
    visible = jnp.tril(jnp.ones((s, s), bool))[None, None] & (seg[:, None, :, None] == seg[:, None, None, :])
    probs = jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1)
    return jnp.einsum('bhst,bthd->bshd', probs, vv)

  def blocked(q, k, v):
    return attention_lib.xla_attention(q, k, v, segment_ids=seg, block_q=6)

  want = jax.vjp(dense_reference, q, k, v)[1](cotangent)
  got = jax.vjp(blocked, q, k, v)[1](cotangent)
  for name, g, w in zip('qkv', got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=ATOL, rtol=RTOL, err_msg=f'd{name}')


def test_causal_query_block_size_default():
  assert attention_lib.causal_block_rows(256) == 64    # 4 blocks
  assert attention_lib.causal_block_rows(1024) == 128  # 8 blocks
  assert attention_lib.causal_block_rows(12) == 64     # short sequences: one block


def test_segments_really_isolate_documents():
  # Without this the test above could pass with a mask that ignores segments on these inputs.
  q, k, v = _qkv(7)
  seg = np.array([[1] * 6 + [2] * 6] * 2, np.int32)
  with_seg = np.asarray(attention_lib.attention(q, k, v, segment_ids=jnp.asarray(seg), impl='xla'))
  without = np.asarray(attention_lib.attention(q, k, v, impl='xla'))
  np.testing.assert_allclose(with_seg[:, :6], without[:, :6], atol=ATOL)  # first document sees no one else
  assert np.abs(with_seg[:, 6:] - without[:, 6:]).max() > 1e-2
  # Changing the first document's values must not move the second document's outputs.
  v2 = v.copy()
  v2[:, :6] += 10.0
  moved = np.asarray(attention_lib.attention(q, k, v2, segment_ids=jnp.asarray(seg), impl='xla'))
  np.testing.assert_allclose(moved[:, 6:], with_seg[:, 6:], atol=ATOL)


def test_unknown_attention_impl_is_refused():
  q, k, v = _qkv(0)
  with pytest.raises(ValueError, match='attention_impl'):
    attention_lib.attention(q, k, v, impl='flash')


# --- RoPE ----------------------------------------------------------------------------------------------------


def test_rope_preserves_norms_and_is_identity_at_zero():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 10, 3, 16)).astype(np.float32))
  pos = jnp.asarray(rng.integers(0, 1000, size=(2, 10)), jnp.int32)
  out = rope(x, pos, 10000.0)
  np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
  np.testing.assert_allclose(rope(x, jnp.zeros_like(pos), 10000.0), x, atol=1e-7)
  assert np.abs(np.asarray(out - x)).max() > 0.1  # it does rotate


def test_rope_dot_products_depend_only_on_relative_position():
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.normal(size=(1, 1, 1, 32)).astype(np.float32))
  k = jnp.asarray(rng.normal(size=(1, 1, 1, 32)).astype(np.float32))

  def dot(m, n):
    qm = rope(q, jnp.full((1, 1), m, jnp.int32), 10000.0)
    kn = rope(k, jnp.full((1, 1), n, jnp.int32), 10000.0)
    return float(jnp.sum(qm * kn))

  for m, n in [(5, 2), (17, 17), (3, 11)]:
    for shift in (1, 40, 500):
      # f32 angles at positions ~500 carry ~1e-4 absolute phase error.
      assert dot(m + shift, n + shift) == pytest.approx(dot(m, n), abs=2e-3)
  assert abs(dot(5, 2) - dot(5, 5)) > 0.5  # a different offset gives a different score


# --- Pallas front door ---------------------------------------------------------------------------------------


def _tiny_cfg(impl, **mesh):
  cfg = config_lib.defaults()
  cfg.model.update(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=16, vocab_size=512,
                   attention_impl=impl)
  cfg.data.seq_len = 16
  cfg.train.update(batch_size=8, steps=10)
  cfg.mesh.update(**mesh)
  return cfg


def _packed_batch():
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, 259, size=3000).astype(np.int32)
  tokens[rng.random(tokens.size) < 0.06] = 1  # BOS: several documents per row
  batch = batch_for_step(PackedStream.from_tokens(tokens), 0, seed=0, global_batch=8, seq_len=16)
  assert (batch['segment_ids'].max(axis=1) > 1).any()
  return batch


def _loss_fn(model, batch):
  """The trainer's per-token loss, through `model` (so its attention_impl and sharder are the ones tested)."""
  def loss(params):
    logits, _ = model.apply({'params': params}, batch['inputs'], batch['positions'], batch['segment_ids'])
    stats = token_losses(logits, batch['targets'], batch['weights'])
    return stats['ce_sum'] / stats['tokens']
  return loss


@pytest.fixture(scope='module')
def xla_reference():
  """Params, loss and grads of the xla model on one device."""
  cfg = _tiny_cfg('xla', data=1)
  trainer = Trainer(cfg, make_sharder(cfg, jax.devices()[:1]))
  params = trainer.init(jax.random.key(0)).params
  batch = trainer.device_batch(_packed_batch())
  loss, grads = jax.jit(jax.value_and_grad(_loss_fn(trainer.model, batch)))(params)
  return jax.device_get(params), float(loss), jax.device_get(grads)


@pytest.mark.parametrize('n_devices,mesh', [
    (1, dict(data=1)),
    (4, dict(data=2, tensor=2)),  # the shard_map path: per-shard kernels over batch and heads
], ids=['one_device', 'data2_tensor2'])
def test_pallas_model_loss_and_grads_match_xla(xla_reference, n_devices, mesh):
  params, ref_loss, ref_grads = xla_reference
  cfg = _tiny_cfg('pallas', **mesh)
  sharder = make_sharder(cfg, jax.devices()[:n_devices])
  # The model is applied directly, so loss and gradients come from the model alone (no optimizer step); the
  # Trainer path on a mesh is test_trainer_builds_with_pallas_on_a_data_parallel_mesh.
  model = Transformer(ModelConfig.from_config(cfg.model), sharder)
  shardings = sharder.tree_shardings(nn.get_partition_spec(
      jax.eval_shape(Transformer(model.cfg, Sharder(None, sharder.rules)).init, jax.random.key(0),
                     *[jnp.zeros((1, 16), jnp.int32)] * 3)['params']))
  params = jax.device_put(params, shardings)
  batch = {k: jax.device_put(v, sharder.sharding(('batch', 'seq'))) for k, v in _packed_batch().items()}
  loss_fn = _loss_fn(model, batch)
  program = str(jax.make_jaxpr(loss_fn)(params))
  assert 'pallas_call' in program and 'shard_map' in program  # the kernel really runs, per shard
  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
  assert float(loss) == pytest.approx(ref_loss, rel=RTOL)
  # Gradients are sums over 128 tokens of products of O(1) terms: allow a little more absolute slack.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), jax.device_get(grads),
               ref_grads)


def test_trainer_builds_with_pallas_on_a_data_parallel_mesh(xla_reference):
  _, ref_loss, _ = xla_reference
  cfg = _tiny_cfg('pallas', data=2, tensor=2)
  trainer = Trainer(cfg, make_sharder(cfg, jax.devices()[:4]))
  params = trainer.init(jax.random.key(0)).params
  loss = jax.jit(_loss_fn(trainer.model, trainer.device_batch(_packed_batch())))(params)
  assert float(loss) == pytest.approx(ref_loss, rel=RTOL)


# --- optimizer -----------------------------------------------------------------------------------------------


def _optim_cfg(schedule, warmup=10, **kw):
  cfg = config_lib.defaults().optim
  cfg.update(lr=1.0, schedule=schedule, warmup_steps=warmup, min_lr_ratio=0.1, decay_fraction=0.2, **kw)
  return cfg


def test_cosine_schedule_values():
  lr = optim.schedule(_optim_cfg('cosine'), 110)
  # Warmup 0 -> 1 over 10 steps, then half a cosine from 1 down to 0.1 over the remaining 100.
  assert float(lr(0)) == pytest.approx(0.0)
  assert float(lr(5)) == pytest.approx(0.5)
  assert float(lr(10)) == pytest.approx(1.0)
  assert float(lr(60)) == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-5)  # cos(pi/2) = 0
  assert float(lr(35)) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)), rel=1e-5)
  assert float(lr(110)) == pytest.approx(0.1, rel=1e-5)


def test_wsd_schedule_values():
  lr = optim.schedule(_optim_cfg('wsd'), 110)
  # Decay over the last round(0.2 * 110) = 22 steps: stable from 10 to 88, linear to 0.1 at 110.
  assert float(lr(5)) == pytest.approx(0.5)
  assert float(lr(10)) == pytest.approx(1.0)
  assert float(lr(50)) == pytest.approx(1.0)
  assert float(lr(88)) == pytest.approx(1.0)
  assert float(lr(99)) == pytest.approx(1.0 - 0.9 * 11 / 22, rel=1e-5)
  assert float(lr(110)) == pytest.approx(0.1, rel=1e-5)


def test_constant_schedule_values():
  lr = optim.schedule(_optim_cfg('constant'), 110)
  assert float(lr(5)) == pytest.approx(0.5)
  assert float(lr(10)) == pytest.approx(1.0)
  assert float(lr(60)) == pytest.approx(1.0)
  assert float(lr(110)) == pytest.approx(1.0)
  no_warmup = optim.schedule(_optim_cfg('constant', warmup=0), 110)
  assert float(no_warmup(0)) == pytest.approx(1.0)


def _abstract_params():
  cfg = _tiny_cfg('xla')
  model = Transformer(ModelConfig.from_config(cfg.model), Sharder(None, ()))
  dummy = jnp.zeros((1, 16), jnp.int32)
  return nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), dummy, dummy, dummy)['params'])


def test_decay_mask_spares_norm_scales_only():
  mask = optim.decay_mask(_abstract_params())
  flat = {'/'.join(str(getattr(p, 'key', p)) for p in path): m
          for path, m in jax.tree_util.tree_leaves_with_path(mask)}
  norms = {k for k in flat if k.endswith('scale')}
  assert norms == {'layers/attn_norm/scale', 'layers/mlp_norm/scale', 'final_norm/scale'}
  assert not any(flat[k] for k in norms)
  assert all(flat[k] for k in flat if k not in norms) and len(flat) > len(norms)


def test_adamw_decays_weights_but_not_norm_scales():
  # With zero gradients Adam's own update is 0, so the whole update is the decoupled decay -lr * wd * p.
  cfg = _optim_cfg('constant', warmup=0, weight_decay=0.5, grad_clip=0.0)
  cfg.lr = 0.1
  params = jax.tree.map(lambda s: jnp.full(s.shape, 2.0, s.dtype), _abstract_params())
  opt = optim.make_optimizer(cfg, 10)
  updates, _ = jax.jit(opt.update)(jax.tree.map(jnp.zeros_like, params), opt.init(params), params)
  for path, u in jax.tree_util.tree_leaves_with_path(updates):
    expected = 0.0 if getattr(path[-1], 'key', None) == 'scale' else -0.1 * 0.5 * 2.0
    np.testing.assert_allclose(u, expected, atol=1e-7, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize('rules', [
    (('heads', 'tensor'), ('kv_heads', None)),      # kv replicated while queries are split
    (('heads', None), ('kv_heads', 'tensor')),      # the reverse
    (('heads', 'tensor'), ('kv_heads', 'tensor')),  # the default
])
def test_pallas_under_shard_map_pairs_each_query_head_with_its_kv_head(rules):
  """Per-shard kernels must see the kv heads their query heads use, whatever the kv_heads rule says."""
  mesh = make_sharder(_tiny_cfg('xla', data=1, tensor=2), jax.devices()[:2]).mesh
  sharder = Sharder(mesh, rules + (('batch', 'data'),))
  q, k, v = _qkv(3, b=2, s=32, h=8, kv=2, d=16)
  segments = jnp.asarray(np.repeat([[1] * 20 + [2] * 12], 2, axis=0), jnp.int32)
  expected = attention_lib.xla_attention(q, k, v, segment_ids=segments)
  got = jax.jit(lambda *a: attention_lib.attention(*a, segment_ids=segments, impl='pallas', sharder=sharder))(
      q, k, v)
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5, rtol=1e-5)
