"""The attention front door: one call, implementations 'xla' | 'pallas' | 'cudnn' | 'auto'.

Training and inference both come through here, so switching kernels is a config edit.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from framework.models import config as model_config

ACT_NAMES = ('batch', 'seq', 'heads', 'head_dim')
KV_NAMES = ('batch', 'seq', 'kv_heads', 'head_dim')


def resolve_impl(impl: str, dtype=jnp.bfloat16, head_dim: int = 128, backend: str | None = None) -> str:
  """The implementation 'auto' stands for: cuDNN on GPU where its fused kernel applies (16-bit inputs, head dim
  a multiple of 8 up to 128), Pallas on TPU, XLA elsewhere."""
  if impl not in model_config.ATTENTION_IMPLS:
    raise ValueError(f'attention_impl {impl!r} is not one of {model_config.ATTENTION_IMPLS}')
  if impl != 'auto':
    return impl
  backend = backend or jax.default_backend()
  if backend == 'gpu':
    return 'cudnn' if model_config.cudnn_supports(jnp.dtype(dtype).name, head_dim) else 'xla'
  return 'pallas' if backend == 'tpu' else 'xla'


def causal_block_rows(s: int) -> int:
  """Query rows per block of the causal XLA attention: blocks of 64 rows, fewer than 8 blocks past 512 rows.

  Measured on the 2-core CPU, forward and backward over 16 x 8 heads x 64: 280 -> 180 ms at 256 tokens (4 blocks)
  and 532 -> 291 ms at 1024 tokens (8 blocks); 8 blocks of 32 rows, or 16 of 64, were slower again.
  """
  return max(64, -(-s // 8))


def xla_attention(q, k, v, *, segment_ids=None, causal=True, sm_scale=None, block_q=None):
  """Plain einsum attention that GSPMD can shard; q [b, s, h, d], k/v [b, t, kv, d] with h % kv == 0.

  Causal self-attention runs block by block over the queries, each block against the keys up to its last row,
  so the score matrices skip most of the masked upper triangle (about 5/8 of the work at 4 blocks) while each
  block is still one softmax, exact, with no merging. block_q: rows per block (default causal_block_rows(s)).

  The blocks work head-major (q [b, kv, g, s, d], k/v [b, kv, t, d]), transposed once here, and a query group's
  g x s rows go through each dot as one matrix. On the 2-core CPU, forward + backward at 4 x 1024 tokens, 8 heads
  over 2 KV heads: 254-265 -> 215-226 ms; without grouping (lm_small, 16 x 256, 8 heads) no change (98-106 ms).
  """
  b, s, h, d = q.shape
  t, kv = k.shape[1], k.shape[2]
  qh = q.reshape(b, s, kv, h // kv, d).transpose(0, 2, 3, 1, 4)
  kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  if not causal or s != t:
    out = _attention_block(qh, kh, vh, segment_ids, segment_ids, causal=causal, q_start=0, sm_scale=sm_scale)
  else:
    block = block_q or causal_block_rows(s)
    outs = []
    for start in range(0, s, block):
      stop = min(start + block, s)
      seg_q = None if segment_ids is None else segment_ids[:, start:stop]
      seg_k = None if segment_ids is None else segment_ids[:, :stop]
      outs.append(_attention_block(qh[:, :, :, start:stop], kh[:, :, :stop], vh[:, :, :stop], seg_q, seg_k,
                                   causal=True, q_start=start, sm_scale=sm_scale))
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, s, h, d)


def _attention_block(q, k, v, seg_q, seg_k, *, causal, q_start, sm_scale):
  """Query rows q_start.. (q [b, kv, g, s, d]) against keys 0..t-1 (k/v [b, kv, t, d]), one softmax over the
  keys; the result [b, kv, g, s, d]."""
  b, kv, g, s, d = q.shape
  t = k.shape[2]
  scale = sm_scale if sm_scale is not None else d ** -0.5
  rows = q.reshape(b, kv, g * s, d)
  scores = jnp.einsum('bkqd,bktd->bkqt', rows, k, preferred_element_type=jnp.float32).reshape(b, kv, g, s, t)
  scores = scores * scale
  mask = jnp.ones((b, 1, 1, s, t), bool)
  if causal:
    mask &= ((q_start + jnp.arange(s))[:, None] >= jnp.arange(t)[None, :])[None, None, None]
  if seg_q is not None:
    mask &= (seg_q[:, :, None] == seg_k[:, None, :])[:, None, None]
  scores = jnp.where(mask, scores, -1e30)
  probs = jax.nn.softmax(scores, axis=-1)
  probs = jnp.where(mask, probs, 0.0)  # rows with no visible key give zeros, not a uniform average
  out = jnp.einsum('bkqt,bktd->bkqd', probs.reshape(b, kv, g * s, t).astype(v.dtype), v)
  return out.reshape(b, kv, g, s, d)


def _cudnn_attention(q, k, v, *, segment_ids, causal):
  mask = None
  if segment_ids is not None:
    mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
  return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation='cudnn')


def _pallas_attention(q, k, v, *, segment_ids, causal, sharder):
  import pallas_kernels  # pylint: disable=g-import-not-at-top  (kernels load only when asked for)
  kernel = functools.partial(pallas_kernels.flash_attention, causal=causal)
  if sharder is None or sharder.mesh is None:
    return kernel(q, k, v, segment_ids=segment_ids)
  # A pallas_call is opaque to GSPMD: run it per shard. Each shard must see whole sequences, and its kv heads
  # must be exactly those its query heads use, so kv heads follow the query heads' split (whatever the
  # 'kv_heads' rule says); where the kv heads cannot be split that way they are repeated up to one per query head.
  q_spec = sharder.spec(('batch', None, 'heads', None))
  if k.shape[2] % sharder.axis_size(('heads',)):
    k, v = (jnp.repeat(x, q.shape[2] // k.shape[2], axis=2) for x in (k, v))
  kv_spec = q_spec
  seg_spec = sharder.spec(('batch', None))
  if segment_ids is None:
    fn = jax.shard_map(lambda q_, k_, v_: kernel(q_, k_, v_), mesh=sharder.mesh,
                       in_specs=(q_spec, kv_spec, kv_spec), out_specs=q_spec, check_vma=False)
    return fn(q, k, v)
  fn = jax.shard_map(lambda q_, k_, v_, s_: kernel(q_, k_, v_, segment_ids=s_), mesh=sharder.mesh,
                     in_specs=(q_spec, kv_spec, kv_spec, seg_spec), out_specs=q_spec, check_vma=False)
  return fn(q, k, v, segment_ids)


def attention(q, k, v, *, segment_ids=None, impl: str = 'xla', causal: bool = True, sharder=None):
  """Self-attention over [batch, seq, heads, head_dim]; k/v may have fewer heads (GQA/MQA).

  segment_ids [batch, seq] keeps packed documents apart: a token sees only keys of its own segment.
  """
  impl = resolve_impl(impl, q.dtype, q.shape[-1], backend=sharder.platform if sharder is not None else None)
  if impl == 'xla':
    return xla_attention(q, k, v, segment_ids=segment_ids, causal=causal)
  if impl == 'cudnn':
    return _cudnn_attention(q, k, v, segment_ids=segment_ids, causal=causal)
  return _pallas_attention(q, k, v, segment_ids=segment_ids, causal=causal, sharder=sharder)
