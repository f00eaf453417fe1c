"""The `model` config section: its defaults, its checks, and what of it fixes the saved parameters' shapes."""
from __future__ import annotations

import ml_collections

from framework.config_checks import Context, fail, one_of, positive
from framework.mesh import shard_count
from framework.tokenizer import ByteTokenizer

ATTENTION_IMPLS = ('xla', 'pallas', 'cudnn', 'auto')
REMAT_POLICIES = ('none', 'full', 'dots', 'dots_no_batch')
DTYPES = ('float32', 'bfloat16', 'float16')


def defaults() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      vocab_size=512,        # >= the tokenizer's 259; a multiple of 128 tiles well
      d_model=256,
      n_layers=4,
      n_heads=4,
      n_kv_heads=4,          # < n_heads gives grouped-query attention
      head_dim=0,            # 0: d_model // n_heads
      d_ff=1024,
      max_seq_len=1024,
      rope_theta=10000.0,
      norm_eps=1e-5,
      init_std=0.02,
      tie_embeddings=False,
      param_dtype='float32',
      dtype='float32',       # compute dtype
      remat_policy='none',   # none | full | dots | dots_no_batch
      scan_unroll=0,         # layers per iteration of the layer loop; 0: auto (all of them on CPU, else 1)
      attention_impl='xla',  # xla | pallas | cudnn | auto
  ))


def head_dim(model_cfg) -> int:
  return model_cfg.head_dim or model_cfg.d_model // model_cfg.n_heads


def cudnn_supports(dtype: str, head_size: int) -> bool:
  """Whether cuDNN's fused attention (through jax.nn.dot_product_attention) takes this dtype and head dim."""
  return dtype in ('bfloat16', 'float16') and head_size % 8 == 0 and head_size <= 128


def structure(model_cfg) -> dict:
  """The fields that fix the parameters' shapes and tree: a checkpoint restores only if these agree."""
  m = model_cfg
  return {'model.vocab_size': m.vocab_size, 'model.d_model': m.d_model, 'model.n_layers': m.n_layers,
          'model.n_heads': m.n_heads, 'model.n_kv_heads': m.n_kv_heads, 'model.head_dim': head_dim(m),
          'model.d_ff': m.d_ff, 'model.tie_embeddings': m.tie_embeddings, 'model.param_dtype': m.param_dtype}


def validate(cfg, ctx: Context) -> None:
  m = cfg.model
  positive(m, 'model', 'vocab_size', 'd_model', 'n_layers', 'n_heads', 'n_kv_heads', 'd_ff', 'max_seq_len',
           'rope_theta', 'norm_eps', 'init_std')
  one_of('model.attention_impl', m.attention_impl, ATTENTION_IMPLS)
  one_of('model.remat_policy', m.remat_policy, REMAT_POLICIES)
  if m.scan_unroll < 0 or m.scan_unroll > m.n_layers:
    fail('model.scan_unroll', f'{m.scan_unroll} must be in [0, model.n_layers={m.n_layers}] (0: auto)')
  one_of('model.param_dtype', m.param_dtype, DTYPES)
  one_of('model.dtype', m.dtype, DTYPES)
  if m.attention_impl == 'cudnn':
    if ctx.backend != 'gpu':
      fail('model.attention_impl', f"'cudnn' needs a GPU but the backend is {ctx.backend!r}; use 'auto' or 'xla'")
    if not cudnn_supports(m.dtype, head_dim(m)):
      fail('model.attention_impl', f"cuDNN's fused attention needs model.dtype bfloat16/float16 and a head dim "
           f"that is a multiple of 8 and <= 128 (got {m.dtype}, {head_dim(m)}); use 'auto' or 'xla'")
  if m.n_heads % m.n_kv_heads:
    fail('model.n_kv_heads', f'{m.n_kv_heads} must divide model.n_heads={m.n_heads}')
  if m.head_dim < 0 or (m.head_dim == 0 and m.d_model % m.n_heads):
    fail('model.head_dim', f'd_model={m.d_model} is not divisible by n_heads={m.n_heads}; set head_dim')
  if head_dim(m) % 2:
    fail('model.head_dim', f'{head_dim(m)} is odd; rotary embeddings need an even head dim (set model.head_dim '
         'or change d_model / n_heads)')
  if cfg.data.source != 'array' and m.vocab_size < ByteTokenizer.vocab_size:
    fail('model.vocab_size', f'{m.vocab_size} is smaller than the byte tokenizer\'s {ByteTokenizer.vocab_size}')
  if cfg.data.seq_len > m.max_seq_len:
    fail('data.seq_len', f'{cfg.data.seq_len} is longer than the model allows (model.max_seq_len='
         f'{m.max_seq_len}); shorten data.seq_len or raise model.max_seq_len')
  for field, value, name in (('model.n_heads', m.n_heads, 'heads'), ('model.n_kv_heads', m.n_kv_heads, 'kv_heads'),
                             ('model.d_ff', m.d_ff, 'mlp'), ('model.vocab_size', m.vocab_size, 'vocab'),
                             ('model.d_model', m.d_model, 'embed'), ('data.seq_len', cfg.data.seq_len, 'seq')):
    count, axes = shard_count(ctx.rules, ctx.sizes, name)
    if value % count:
      fail(field, f'{value} is not divisible by the {count} shards of logical axis {name!r} (mesh axes {axes} '
           'via mesh.axis_rules); change the size, the mesh sizes or the rule')
