"""Serving the associative recurrent memory transformer (framework/models/armt.py) on the paged engine.

A sequence is served segment by segment, as the model reads it: the tokens of its current segment live in the
sequence's KV pages at their positions within the segment (RoPE positions restart in every segment), and every
layer l reads the slot's associative memory (A_l, z_l) before its block, exactly as the training model's cell
does (skipped on the first segment). So a decode token or a prefill chunk (chunks never cross a segment end)
attends to its own segment only, through the same paged attention as the decoder's.

When a sequence's segment is complete, `make_write` runs its M memory embeddings at positions seg..seg+M-1 as
one more chunk of the segment (they attend to the whole segment and causally to each other), and each layer's
output memory rows update that layer's (A_l, z_l) with `memory_write`. The next segment then reuses the same
pages from position 0: a sequence holds the pages of seg + M rows at most, however long it grows.

The memory lives on the device as A [L, slots + 1, d_key, d] and z [L, slots + 1, d_key] (f32); the extra row is
scratch for the padding rows of a write.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from framework.inference import forward
from framework.inference.forward import Attend
from framework.inference.kv_cache import KVCache, cache_names
from framework.models.armt import memory_read, memory_write
from framework.models.layers import ModelConfig


def init_memory(model_cfg: ModelConfig, slots: int):
  """(A, z) for `slots` sequences and the scratch row, all zero."""
  d_key = 6 * model_cfg.armt.d_mem
  zeros = jax.jit(lambda: (jnp.zeros((model_cfg.n_layers, slots + 1, d_key, model_cfg.d_model), jnp.float32),
                           jnp.zeros((model_cfg.n_layers, slots + 1, d_key), jnp.float32)))
  return zeros()


def memory_params(params) -> dict:
  return {'wq': params['mem_wq'], 'wk': params['mem_wk'], 'wv': params['mem_wv'],
          'wb': params['mem_wb'].astype(jnp.float32), 'bb': params['mem_bb'].astype(jnp.float32)}


def _run(cfg: ModelConfig, sh, attend: Attend, params, cache: KVCache, memory, batch, x, collect=None):
  """The layers over the rows of `batch` with each layer's memory read first. batch['armt'] names each part's
  slots and first-segment flags: dec_first [S] (decode row i is slot i), pre_slot / pre_first [R].
  `collect(layer output, w, a, z)` -> per-layer result, stacked as the second return value."""
  a_all, z_all = memory
  block = forward.layer_block(cfg, sh, attend, batch)
  info = batch['armt']
  dec, pre = batch.get('dec'), batch.get('pre')
  s = 0 if dec is None else dec['positions'].shape[0]
  use_memory = cfg.armt.memory

  def read(x, w, a, z):
    parts = []
    if dec is not None:
      parts.append(memory_read(x[0, :s, None], w['wq'], a[:s], z[:s], info['dec_first'][:, None, None])[:, 0])
    if pre is not None:
      r, c = pre['positions'].shape
      slot = info['pre_slot']
      rows = x[0, s:].reshape(r, c, -1)
      parts.append(memory_read(rows, w['wq'], a[slot], z[slot], info['pre_first'][:, None, None]).reshape(r * c, -1))
    return jnp.concatenate(parts)[None]

  def body(carry, per_layer):
    x, kv, layer = carry
    p, w, a, z = per_layer
    if use_memory:
      x = read(x, w, a, z)
    x, kv = block(p, x, kv, layer, False)
    return (x, kv, layer + 1), None if collect is None else collect(x, w, a, z)

  w_all = memory_params(params)
  if isinstance(params['layers'], tuple):  # per-layer weights (forward.serving_params): the layers one by one
    carry, outs = (x, cache, 0), []
    for i, p in enumerate(params['layers']):
      carry, out = body(carry, (p, jax.tree.map(lambda t, i=i: t[i], w_all), a_all[i], z_all[i]))
      outs.append(out)
    out = None if collect is None else jax.tree.map(lambda *t: jnp.stack(t), *outs)
    return carry[1], carry[0], out
  (x, cache, _), out = jax.lax.scan(body, (x, cache, jnp.int32(0)), (params['layers'], w_all, a_all, z_all))
  return cache, x, out


@functools.lru_cache(maxsize=16)
def make_step(model_cfg: ModelConfig, sharder, attention_impl: str):
  """`(params, cache, memory, batch) -> (cache, tokens, logprobs)`: the engine's step (forward.make_step's batch
  plus batch['armt']) for an ARMT model; the cache is donated, the memory only read."""
  attend = Attend(forward.resolve_attention(attention_impl, sharder.platform), sharder)

  def step(params, cache, memory, batch):
    x = forward.embed(model_cfg, sharder, params, forward.step_tokens(batch))
    cache, x, _ = _run(model_cfg, sharder, attend, params, cache, memory, batch, x)
    return forward.sample_last(model_cfg, params, cache, x[0], batch)
  return jax.jit(step, out_shardings=(sharder.sharding(cache_names()), None, None), donate_argnums=(1,))


@functools.lru_cache(maxsize=16)
def make_write(model_cfg: ModelConfig, sharder, attention_impl: str):
  """`(params, cache, memory, batch) -> (cache, memory)`: writes completed segments into their slots' memory.

  batch: 'pre' {positions, write_page, write_offset [K, M], table [K, W], lengths [K]}: the memory rows of K
  segments (padding rows: slot `slots`, the scratch page); 'armt' {pre_slot, pre_first [K]}. Cache and memory
  are donated."""
  attend = Attend(forward.resolve_attention(attention_impl, sharder.platform), sharder)

  def write(params, cache, memory, batch):
    k, m = batch['pre']['positions'].shape
    x = jnp.broadcast_to(params['memory'].astype(model_cfg.dtype)[None], (k, m, model_cfg.d_model))
    slot, first = batch['armt']['pre_slot'], batch['armt']['pre_first']

    def collect(x, w, a, z):
      # A new sequence's first write starts from an empty memory, whatever the slot's last sequence left there.
      a0 = jnp.where(first[:, None, None], 0.0, a[slot])
      z0 = jnp.where(first[:, None], 0.0, z[slot])
      one = lambda rows, a1, z1, f: jax.tree.map(lambda t: t[0], memory_write(rows[None], w, a1[None], z1[None], f))
      return jax.vmap(one)(x[0].reshape(k, m, -1), a0, z0, first)

    cache, _, (new_a, new_z) = _run(model_cfg, sharder, attend, params, cache, memory, batch,
                                    x.reshape(1, k * m, -1), collect)
    a_all, z_all = memory
    return cache, (a_all.at[:, slot].set(new_a), z_all.at[:, slot].set(new_z))
  return jax.jit(write, out_shardings=(sharder.sharding(cache_names()), None), donate_argnums=(1, 2))
