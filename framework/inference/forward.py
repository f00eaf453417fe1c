"""One jitted engine step: the decoder over a mixed batch of decode tokens and prefill chunks, against the paged
KV cache, followed by sampling.

The batch has fixed shapes: `slots` decode rows of one token each and (in a mixed step) a power of two, at most
`prefill_rows`, of rows of `prefill_chunk` prompt tokens, right-aligned (a short chunk is padded on the left; its padding writes to the
scratch page and its queries see nothing). All rows' tokens go through the projections and feed-forward layers
as one matrix (Sarathi-Serve's piggybacking: decodes ride along with the prefill's matmuls); only attention is
per row. Each layer first writes the new tokens' K and V into their pages, then every row attends over its own
pages up to its length (`decode_attention`'s semantics: query t of a row of T new tokens sees the positions
before lengths - T + t + 1).

Shared prefixes (Hydragen): a decode row in prefix group g attends to its own pages after the prefix (its
suffix table) and, separately, every decode query attends to each group's prefix pages in one matrix-matrix
pass (`shared_prefix_attention`, the prefix read once per step for the whole group); the parts are merged
exactly by their log-sum-exps. The attention's page-table width is whatever the caller's arrays have, so the
engine buckets widths (powers of two) and each bucket compiles once. With the XLA attention (CPU) the decode rows
take a ragged page list instead (`Attend.ragged`): every row's pages back to back, its length bucketed, so a step
reads the pages its rows hold rather than every row at the longest row's width.

The layers are the training model's own modules (framework/models/transformer.py), applied one layer at a time
(to per-layer weights where the step unrolls its layers, `serving_params`): the same projections, RoPE, norms,
SwiGLU and MoE as training.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from framework.inference import sampling
from framework.inference.kv_cache import KVCache, cache_names
from framework.models.dense import dense
from framework.models.layers import ModelConfig, RMSNorm, SwiGLU
from framework.models.moe import MoE
from framework.models.transformer import Attention, scan_unroll
from pallas_kernels.decode_attention import combine as combine_lib
from pallas_kernels.decode_attention import reference as attention_reference


def resolve_attention(impl: str, platform: str) -> str:
  """'auto': the Pallas decode kernels where they compile (GPU, TPU), the jnp reference on CPU (where Pallas
  runs only in its interpreter)."""
  if impl == 'auto':
    return 'xla' if platform == 'cpu' else 'pallas'
  return impl


def inference_model_config(model_cfg: ModelConfig) -> ModelConfig:
  """MoE layers serve dropless: a capacity limit would drop a token depending on which other requests share
  the step, so one request could change another's output."""
  if model_cfg.moe is None or model_cfg.moe.dispatch == 'dropless':
    return model_cfg
  return dataclasses.replace(model_cfg, moe=dataclasses.replace(model_cfg.moe, dispatch='dropless'))


class Attend:
  """Paged attention for the rows of one step (K and V of the layer already hold the new tokens)."""

  def __init__(self, impl: str, sharder):
    self.impl, self.sharder = impl, sharder

  def _kernels(self):
    if self.impl == 'xla':
      return attention_reference.decode_attention_reference, attention_reference.shared_prefix_attention_reference
    import pallas_kernels  # pylint: disable=g-import-not-at-top  (kernels load only when asked for)
    decode, prefix = pallas_kernels.decode_attention, pallas_kernels.shared_prefix_attention
    sh = self.sharder
    if sh is None or sh.mesh is None:
      return decode, prefix
    # A pallas_call is opaque to GSPMD: run it per tensor-parallel shard of the heads.
    q_spec, kv_spec = sh.spec((None, None, 'heads', None)), sh.spec((None, None, 'kv_heads', None))
    lse_spec = sh.spec((None, None, 'heads'))
    rep = sh.spec((None,))
    decode_sharded = jax.shard_map(decode, mesh=sh.mesh, in_specs=(q_spec, kv_spec, kv_spec, rep),
                                   out_specs=(q_spec, lse_spec), check_vma=False)
    prefix_spec = sh.spec((None, 'kv_heads', None))
    prefix_sharded = jax.shard_map(lambda q, k, v, n: prefix(q, k, v, prefix_length=n), mesh=sh.mesh,
                                   in_specs=(q_spec, prefix_spec, prefix_spec, sh.spec(())),
                                   out_specs=(q_spec, lse_spec), check_vma=False)
    return decode_sharded, lambda q, k, v, prefix_length: prefix_sharded(q, k, v, prefix_length)

  def rows(self, q, k_layer, v_layer, table, lengths):
    """q [R, T, H, D] over pages table [R, W] of the layer's [P, page, kv, D] K and V."""
    decode, _ = self._kernels()
    r, w = table.shape
    page = k_layer.shape[1]
    k = k_layer[table].reshape(r, w * page, *k_layer.shape[2:])
    v = v_layer[table].reshape(r, w * page, *v_layer.shape[2:])
    return decode(q, k, v, lengths)

  def ragged(self, q, k_layer, v_layer, pages, page_row, page_start, lengths):
    """Decode rows q [S, 1, H, D] over their own pages only: `pages` [N] lists every row's pages back to back
    (row `page_row`, first position `page_start` within the row; padding entries start past any length). The
    work follows the tokens the rows hold, not rows x the longest row as a page table's does; a row with no
    pages gets lse -inf. Same results as `rows` (and `decode_attention`) for T = 1."""
    s, _, h, d = q.shape
    kv_heads, page = k_layer.shape[2], k_layer.shape[1]
    group = h // kv_heads
    k, v = k_layer[pages], v_layer[pages]  # [N, page, kv, D]
    qg = q[:, 0].reshape(s, kv_heads, group, d)[page_row]  # each page's row query [N, kv, g, D]
    scores = jnp.einsum('nkgd,npkd->nkgp', qg, k, preferred_element_type=jnp.float32) / math.sqrt(d)
    valid = page_start[:, None] + jnp.arange(page)[None] < lengths[page_row][:, None]  # [N, page]
    scores = jnp.where(valid[:, None, None], scores, -jnp.inf)
    # Per-row reductions as a one-hot [N, S] (no scatter: XLA:CPU crashed on segment_sum under a tensor mesh).
    mine = page_row[:, None] == jnp.arange(s)[None]
    top = jnp.where(mine[..., None, None], scores.max(-1)[:, None], -jnp.inf).max(0)  # [S, kv, g]
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    weights = jnp.exp(scores - top[page_row][..., None])
    onehot = mine.astype(jnp.float32)
    total = jnp.einsum('ns,nkg->skg', onehot, weights.sum(-1))
    v = jnp.where(valid[..., None, None], v, jnp.zeros((), v.dtype))  # 0 x garbage in unused slots is NaN
    per_page = jnp.einsum('nkgp,npkd->nkgd', weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
    out = jnp.einsum('ns,nkgd->skgd', onehot, per_page)
    out = out / jnp.maximum(total, jnp.finfo(jnp.float32).tiny)[..., None]
    lse = jnp.where(total > 0, top + jnp.log(total), -jnp.inf)
    return out.reshape(s, 1, h, d).astype(q.dtype), lse.reshape(s, 1, h)

  def prefixes(self, q, k_layer, v_layer, tables, lengths, groups):
    """Each of G prefixes (pages tables [G, W], lengths [G]) against every query of q [R, 1, H, D]; the result
    counts for the rows whose `groups` entry is g and is empty (lse -inf) for the others."""
    _, prefix = self._kernels()
    g_count, w = tables.shape
    page = k_layer.shape[1]
    k = k_layer[tables].reshape(g_count, w * page, *k_layer.shape[2:])
    v = v_layer[tables].reshape(g_count, w * page, *v_layer.shape[2:])
    parts = []
    for g in range(g_count):
      out, lse = prefix(q, k[g], v[g], prefix_length=lengths[g])
      # Rows outside the group (and an unused group of length 0, whose output is undefined) contribute nothing.
      mine = (groups == g)[:, None, None]
      parts.append((jnp.where(mine[..., None], out, 0), jnp.where(mine, lse, -jnp.inf)))
    return parts


@functools.lru_cache(maxsize=32)
def make_step(model_cfg: ModelConfig, sharder, attention_impl: str):
  """The jitted step `(params, cache, batch) -> (cache, tokens [rows], logprobs [rows])`; the cache is donated.
  One per (model, mesh, attention), shared by every engine that serves them, so a new engine compiles nothing
  an earlier one already did. Parameters come placed on `sharder`'s mesh; the step keeps their layout.

  batch (host-built, see framework/inference/engine.py): 'dec' {tokens, positions, lengths, write_page,
  write_offset [S], and either table [S, W] or (with the XLA attention) the ragged page list pages, page_row,
  page_start [N]}; optional 'pre' {tokens, positions, write_page, write_offset [R, C], table [R, W],
  lengths [R]}; optional 'prefix' {table [G, W], lengths [G], groups [S]}; 'sample' {temperature, top_k, top_p,
  seeds, counters} [S + R]. Output row r < S is decode row r, row S + j is prefill row j's last token.
  """
  cfg = inference_model_config(model_cfg)
  attend = Attend(resolve_attention(attention_impl, sharder.platform), sharder)
  fn = functools.partial(_step, cfg, sharder, attend)
  cache_sharding = sharder.sharding(cache_names())
  return jax.jit(fn, out_shardings=(cache_sharding, None, None), donate_argnums=(1,))


def _step(cfg: ModelConfig, sh, attend: Attend, params, cache: KVCache, batch):
  cache, x = run_layers(cfg, sh, attend, params, cache, batch)
  return sample_last(cfg, params, cache, x, batch)


def sample_last(cfg: ModelConfig, params, cache: KVCache, x, batch):
  """(cache, tokens, logprobs): samples every decode row and each prefill row's last token from the layers'
  output x [N, d]."""
  s = batch['dec']['tokens'].shape[0]
  last = [x[:s]]
  pre = batch.get('pre')
  if pre is not None:
    r, c = pre['tokens'].shape
    last.append(x[s:].reshape(r, c, -1)[:, -1])
  logits = head_logits(cfg, params, jnp.concatenate(last))
  smp = batch['sample']
  tokens, logprobs = sampling.sample(logits, smp['temperature'], smp['top_k'], smp['top_p'], smp['seeds'],
                                     smp['counters'])
  return cache, tokens, logprobs


def head_logits(cfg: ModelConfig, params, x):
  """f32 logits [N, V] of hidden states x [N, d] (the final norm, then the output head)."""
  h = RMSNorm(cfg).apply({'params': params['final_norm']}, x[None])
  head = params['embedding'].T if cfg.tie_embeddings else params['head']
  return dense(h, head.astype(h.dtype), out_dtype=jnp.float32)[0]


def run_layers(cfg: ModelConfig, sh, attend: Attend, params, cache: KVCache, batch):
  """Every layer over the step's tokens (the 'dec' rows, if any, then the 'pre' rows flattened), writing their
  K and V into the cache: (cache, hidden states [N, d] before the final norm)."""
  block = layer_block(cfg, sh, attend, batch)
  x = embed(cfg, sh, params, step_tokens(batch))
  x, cache = _layers(cfg, sh, params['layers'], x, cache, block)
  return cache, x[0]


def step_tokens(batch) -> jax.Array:
  """The step's tokens in row order, as `layer_block` sees them: the 'dec' rows, then the 'pre' rows flattened."""
  return _flat(batch, 'tokens')


def embed(cfg: ModelConfig, sh, params, tokens) -> jax.Array:
  """[1, N, d]: every token of the step as one sequence."""
  table = sh.constrain(params['embedding'], (None, 'act_embed'))
  return jnp.take(table, tokens, axis=0)[None]


def _flat(batch, name):
  dec, pre = batch.get('dec'), batch.get('pre')
  return jnp.concatenate(([dec[name]] if dec is not None else []) +
                         ([pre[name].reshape(-1)] if pre is not None else []))


def layer_block(cfg: ModelConfig, sh, attend: Attend, batch):
  """`block(p, x [1, N, d], kv, layer, use_moe) -> (x, kv)`: one decoder layer (its parameters p) over the
  step's rows of `batch` ('dec', 'pre', 'prefix'), its attention writing the new K and V into the cache first."""
  dec, pre, prefix = batch.get('dec'), batch.get('pre'), batch.get('prefix')
  s = 0 if dec is None else dec['tokens'].shape[0]
  positions = _flat(batch, 'positions')[None]
  write_page, write_offset = _flat(batch, 'write_page'), _flat(batch, 'write_offset')

  def attention(q, k, v, kv, layer):
    k_all = kv.k.at[layer, write_page, write_offset].set(k[0].astype(kv.k.dtype))
    v_all = kv.v.at[layer, write_page, write_offset].set(v[0].astype(kv.v.dtype))
    k_layer, v_layer = k_all[layer], v_all[layer]
    h, d = q.shape[2:]
    outs = []
    if dec is not None:
      q_dec = q[0, :s, None]  # [S, 1, H, D]
      if 'pages' in dec:
        parts = [attend.ragged(q_dec, k_layer, v_layer, dec['pages'], dec['page_row'], dec['page_start'],
                               dec['lengths'])]
      else:
        parts = [attend.rows(q_dec, k_layer, v_layer, dec['table'], dec['lengths'])]
      if prefix is not None:
        parts += attend.prefixes(q_dec, k_layer, v_layer, prefix['table'], prefix['lengths'], prefix['groups'])
      out = parts[0][0] if len(parts) == 1 else combine_lib.combine_attention(parts)[0]
      outs.append(out.reshape(s, h, d))
    if pre is not None:
      q_pre = q[0, s:].reshape(*pre['positions'].shape, h, d)
      outs.append(attend.rows(q_pre, k_layer, v_layer, pre['table'], pre['lengths'])[0].reshape(-1, h, d))
    return jnp.concatenate(outs)[None], KVCache(k_all, v_all)

  def block(p, x, kv, layer, use_moe):
    h = RMSNorm(cfg).apply({'params': p['attn_norm']}, x)
    attn = Attention(cfg, sh)
    q, k, v = attn.apply({'params': p['attn']}, h, positions, method=Attention.qkv)
    o, kv = attention(q, k, v, kv, layer)
    x = x + attn.apply({'params': p['attn']}, o, method=Attention.out)
    h = RMSNorm(cfg).apply({'params': p['mlp_norm']}, x)
    if use_moe:
      e = cfg.moe.num_experts
      y, _ = MoE(cfg, sh).apply({'params': p['moe']}, h, jnp.zeros((e,), jnp.float32), jnp.float32(1.0))
    else:
      y = SwiGLU(cfg, sh).apply({'params': p['mlp']}, h)
    return x + y.astype(x.dtype), kv

  return block


def _layer_slices(cfg: ModelConfig) -> list[tuple[str | None, tuple[int, ...], bool]]:
  """Where each layer's weights sit in the stacks, in depth order: (subtree or None, index, is MoE)."""
  m = cfg.moe
  if m is None or m.every == 1:
    return [(None, (i,), m is not None) for i in range(cfg.n_layers)]
  out = []
  for g in range(cfg.n_layers // m.every):
    out += [('dense', (g, j), False) for j in range(m.every - 1)]
    out.append(('moe_block', (g,), True))
  return out


def serving_params(cfg: ModelConfig, sh, params):
  """The parameters as the step reads them: where the step unrolls its layers (CPU, or model.scan_unroll >=
  n_layers) 'layers' becomes a tuple of per-layer trees in depth order, because slicing a layer out of the stacks
  inside the step copies its weights every step (on CPU the copies cost more than a decode step's matmuls);
  elsewhere the stacks, for the rolled loop. Sharding follows the stacks' (their layer dims dropped). The split is
  a copy: while the caller still holds the stacks, the weights are in memory twice."""
  if scan_unroll(cfg, sh, cfg.n_layers) < cfg.n_layers or isinstance(params['layers'], tuple):
    return params
  slices = _layer_slices(cfg)
  pick = lambda tree, key: tree if key is None else tree[key]

  def split(layers):
    return tuple(jax.tree.map(lambda a, ix=ix: a[ix], pick(layers, key)) for key, ix, _ in slices)

  def drop(s, n):
    return jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec(*tuple(s.spec)[n:]))

  layers = params['layers']
  shardings = tuple(jax.tree.map(lambda a, n=len(ix): drop(a.sharding, n), pick(layers, key)) for key, ix, _ in slices)
  return dict(params, layers=jax.jit(split, out_shardings=shardings)(layers))


def _layers(cfg: ModelConfig, sh, layer_params, x, cache: KVCache, block):
  """The layers in order: per-layer trees (serving_params) one after another, or the stacks (dense, every-layer
  MoE, or groups of `moe.every` with one MoE last) in a loop."""
  if isinstance(layer_params, tuple):
    for i, (p, (_, _, use_moe)) in enumerate(zip(layer_params, _layer_slices(cfg), strict=True)):
      x, cache = block(p, x, cache, i, use_moe)
    return x, cache
  m = cfg.moe
  if m is None or m.every == 1:
    use_moe = m is not None

    def body(carry, p):
      x, kv, layer = carry
      x, kv = block(p, x, kv, layer, use_moe)
      return (x, kv, layer + 1), None

    (x, cache, _), _ = jax.lax.scan(body, (x, cache, jnp.int32(0)), layer_params,
                                    unroll=scan_unroll(cfg, sh, cfg.n_layers))
    return x, cache

  def group(carry, p):
    x, kv, layer = carry

    def dense_body(inner, pd):
      x, kv, layer = inner
      x, kv = block(pd, x, kv, layer, False)
      return (x, kv, layer + 1), None

    (x, kv, layer), _ = jax.lax.scan(dense_body, (x, kv, layer), p['dense'])
    x, kv = block(p['moe_block'], x, kv, layer, True)
    return (x, kv, layer + 1), None

  (x, cache, _), _ = jax.lax.scan(group, (x, cache, jnp.int32(0)), layer_params)
  return x, cache
