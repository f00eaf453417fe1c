"""Associative recurrent memory transformer (ARMT, Rodkin et al. 2024) with a sequential and a diagonal executor.

Each row is cut into S segments of `armt.segment_len` tokens (the last one padded, its pads masked out of
attention and dropped from the logits); M learned memory embeddings are appended to every segment, so a cell
(layer l, segment s) works on T = segment_len + M rows, attention causal over [segment; memory]. Every layer l
carries an associative memory A_l [d_key, d_model] and normaliser z_l [d_key] (f32, zero at the start) from segment
to segment, per sequence. With phi the DPFP feature map (nu = 3, d_key = 6 d_mem):

  read, before the layer's block, every row (skipped on the first segment):
      x <- x + phi(W_Q x) A / (z . phi(W_Q x) + 1e-5)
  write, from the block's output memory rows m_i: k = phi(W_K m), v = W_V m, beta = sigmoid(W_beta m + b),
      v_old = k A / (z . k + 1e-5),  gamma = clip(1 - (z . k + 1e-5) / (|k|^2 + 1e-5), 0, 1)  (no gradient),
      A <- A + sum_i beta_i k_i (x) (v_i - v_old_i),  z <- z + sum_i gamma_i k_i  (first segment: v_old = 0, gamma = 1)

The block is the dense decoder's `Block` (its attention front door, SwiGLU, norms and logical axis names), with
the layers' parameters stacked [L, ...] under 'layers' as in the dense model. W_V starts at zero (the paper's
init: the memory starts empty and training fills it).

Cell (l, s) needs (l - 1, s)'s hidden states and (l, s - 1)'s memory, so the cells with l + s = t are independent.
The sequential executor (the reference) runs segment after segment, each through the layers (lax.scan over both);
the diagonal executor runs the L + S - 1 wavefronts t, each cell of a wavefront at once: the block and the
memory maths vmapped over the stacked cells, so every weight matmul is one matmul over all the cells' rows with
each cell's own layer weights: `armt.cell_matmul` picks a batched matmul or a grouped matmul (jax.lax.ragged_dot,
or pallas_kernels.grouped_matmul with its kernel backward), through `dense`'s vmap rule (framework/models/dense.py). The underfull first and last L - 1 wavefronts are unrolled
with exactly their cells (no padded work); the full ones in between run as one lax.scan.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from framework.mesh import Sharder
from framework.models.dense import dense
from framework.models.layers import ModelConfig, RMSNorm, param, stacked_matmul
from framework.models.transformer import remat_block

EPS = 1e-5


def dpfp(x: jax.Array) -> jax.Array:
  """DPFP feature map, nu = 3: u = [relu(x); relu(-x)], phi = concat_j u * roll(u, j), j = 1..3 (f32)."""
  x = x.astype(jnp.float32)
  u = jnp.concatenate([jax.nn.relu(x), jax.nn.relu(-x)], axis=-1)
  return jnp.concatenate([u * jnp.roll(u, j, axis=-1) for j in (1, 2, 3)], axis=-1)


def memory_read(x, wq, a, z, first, stacked='batched'):
  """x [B, T, d] plus what the memory (a [B, d_key, d], z [B, d_key]) recalls for each row; x itself when first.
  `stacked`: `dense`'s, for the diagonal executor's vmap over cells."""
  q = dpfp(dense(x, wq, stacked=stacked))
  recalled = jnp.einsum('btk,bkd->btd', q, a) / (jnp.einsum('btk,bk->bt', q, z) + EPS)[..., None]
  return jnp.where(first, x, x + recalled.astype(x.dtype))


def memory_write(m, w, a, z, first, stacked='batched'):
  """The memory after writing the memory rows m [B, M, d] (see the module docstring)."""
  k = dpfp(dense(m, w['wk'], stacked=stacked))
  v = dense(m, w['wv'], stacked=stacked).astype(jnp.float32)
  beta = jax.nn.sigmoid(jnp.einsum('bmd,d->bm', m.astype(jnp.float32), w['wb']) + w['bb'])
  kz = jnp.einsum('bmk,bk->bm', k, z) + EPS
  v_old = jnp.where(first, 0.0, jnp.einsum('bmk,bkd->bmd', k, a) / kz[..., None])
  gamma = jnp.where(first, 1.0, jax.lax.stop_gradient(jnp.clip(1 - kz / (jnp.sum(k * k, -1) + EPS), 0.0, 1.0)))
  a = a + jnp.einsum('bm,bmk,bmd->bkd', beta, k, v - v_old)
  z = z + jnp.einsum('bm,bmk->bk', gamma, k)
  return a, z


def _take(tree, index):
  return jax.tree.map(lambda w: w[index], tree)


def run_sequential(cell, layers, memory, x_in, sids, a0, z0, remat=False, fresh=True):
  """Segment after segment, layer after layer. x_in [S, B, T, d], sids [S, B, T]; a0/z0 stacked [L, ...], the
  memory before the first segment (`fresh`: empty, so the first segment neither reads it nor corrects its writes).
  Returns (outputs [S, B, T, d] of the last layer, (A, z) after the last segment, cells run)."""
  n_layers, n_segments = a0.shape[0], x_in.shape[0]

  def segment(state, xs):
    x, sid, first = xs

    def layer(h, per_layer):
      p, w, a, z = per_layer
      h, a, z = cell(p, w, h, a, z, first, sid)
      return h, (a, z)
    y, new_state = jax.lax.scan(layer, x, (layers, memory, *state))
    return new_state, y
  if remat:
    segment = jax.checkpoint(segment)
  first = (jnp.arange(n_segments) == 0) & fresh
  state, ys = jax.lax.scan(segment, (a0, z0), (x_in, sids, first))
  return ys, state, n_layers * n_segments


def wavefronts(n_layers: int, n_segments: int) -> list[tuple[int, int]]:
  """The diagonal schedule: for each step t, the (lowest, highest) layer of its cells (l, t - l)."""
  return [(max(0, t - n_segments + 1), min(t, n_layers - 1)) for t in range(n_layers + n_segments - 1)]


def run_diagonal(cell, layers, memory, x_in, sids, a0, z0, remat=False, fresh=True):
  """The L + S - 1 wavefronts, every cell of one at once. Same arguments and results as run_sequential; the last
  result counts the wavefront steps run."""
  n_layers, n_segments = a0.shape[0], x_in.shape[0]
  cells = jax.vmap(cell)

  def step(carry, t, lo, hi):
    """Wavefront t over layers lo..hi; t may be traced (the full wavefronts' scan), lo and hi are static."""
    h, a, z = carry  # h[l]: layer l's output at the previous step
    entering = [jax.lax.dynamic_index_in_dim(x_in, jnp.minimum(t, n_segments - 1), keepdims=True)] if lo == 0 else []
    inputs = jnp.concatenate(entering + [h[max(lo, 1) - 1:hi]], axis=0)
    layer_ids = jnp.arange(lo, hi + 1)
    seg_ids = jnp.take(sids, t - layer_ids, axis=0)
    ys, a_new, z_new = cells(_take(layers, slice(lo, hi + 1)), _take(memory, slice(lo, hi + 1)), inputs,
                             a[lo:hi + 1], z[lo:hi + 1], (t - layer_ids == 0) & fresh, seg_ids)
    return (h.at[lo:hi + 1].set(ys), a.at[lo:hi + 1].set(a_new), z.at[lo:hi + 1].set(z_new)), ys[-1]
  if remat:
    step = jax.checkpoint(step, static_argnums=(2, 3))

  carry = (jnp.zeros((n_layers,) + x_in.shape[1:], x_in.dtype), a0, z0)
  schedule, outputs, steps = wavefronts(n_layers, n_segments), [], 0
  full = [t for t, (lo, hi) in enumerate(schedule) if lo == 0 and hi == n_layers - 1]
  t = 0
  while t < len(schedule):
    if full and t == full[0]:  # the full wavefronts: one scan, each iteration one step
      carry, ys = jax.lax.scan(lambda c, tt: step(c, tt, 0, n_layers - 1), carry, jnp.arange(full[0], full[-1] + 1))
      outputs.append(ys)
      steps += len(full)
      t = full[-1] + 1
      continue
    lo, hi = schedule[t]
    carry, y = step(carry, jnp.asarray(t), lo, hi)
    if hi == n_layers - 1:
      outputs.append(y[None])
    steps += 1
    t += 1
  return jnp.concatenate(outputs, axis=0), (carry[1], carry[2]), steps


EXECUTORS = {'sequential': run_sequential, 'diagonal': run_diagonal}


class ARMT(nn.Module):
  """tokens [batch, seq] -> (logits [batch, seq, vocab] f32, {}), like the dense Transformer (framework/train.py).

  Each row is one stream: the batch's positions and segment ids are not used (positions restart in every
  segment; the memory is what carries across segments, and across packed documents too).
  """
  cfg: ModelConfig
  sharder: Sharder

  def __call__(self, tokens, positions=None, segment_ids=None, balance=None, domains=None):
    del positions, segment_ids, balance, domains
    logits, _, _ = self.forward(tokens)
    return logits, {}

  @nn.compact
  def forward(self, tokens, executor: str | None = None, state=None, length=None):
    """(logits, (A [L, B, d_key, d], z [L, B, d_key]) after the last segment, steps the executor ran).

    `state`: the memory (A, z) to start from (what an earlier call returned), so a long input can be fed segment
    by segment (generation); None: empty. `length` (may be traced): only the first `length` tokens are real, the
    rest padding, as a ragged last segment's; None: all of them."""
    c, a, sh = self.cfg, self.cfg.armt, self.sharder
    b, n = tokens.shape
    seg, m = a.segment_len, a.memory_tokens
    n_segments = math.ceil(n / seg)
    d_key = 6 * a.d_mem
    embedding = param(self, 'embedding', (c.vocab_size, c.d_model), ('vocab', 'embed'), c.init_std, c)
    mem_embed = param(self, 'memory', (m, c.d_model), (None, 'embed'), c.init_std, c)
    memory = {
        'wq': param(self, 'mem_wq', (c.n_layers, c.d_model, a.d_mem), ('layers', 'embed', None), c.init_std, c),
        'wk': param(self, 'mem_wk', (c.n_layers, c.d_model, a.d_mem), ('layers', 'embed', None), c.init_std, c),
        'wv': param(self, 'mem_wv', (c.n_layers, c.d_model, c.d_model), ('layers', 'embed', None), 0.0, c),
        'wb': param(self, 'mem_wb', (c.n_layers, c.d_model), ('layers', 'embed'), c.init_std, c).astype(jnp.float32),
        'bb': param(self, 'mem_bb', (c.n_layers,), ('layers',), 0.0, c).astype(jnp.float32),
    }
    block = remat_block(c)(c, sh)
    rows = seg + m  # a cell's rows: the segment's tokens, then the memory tokens
    if self.is_initializing():  # the layers' parameters, stacked [L, ...] under 'layers' as the dense model's
      stacked = nn.vmap(remat_block(c), variable_axes={'params': 0}, split_rngs={'params': True}, in_axes=None,
                        axis_size=c.n_layers, metadata_params={nn.PARTITION_NAME: 'layers'})
      dummy = jnp.zeros((1, rows), jnp.int32)
      stacked(c, sh, name='layers')(jnp.zeros((1, rows, c.d_model), c.dtype), dummy, dummy)
    layers = nn.meta.unbox(self.variables['params']['layers'])

    pad = n_segments * seg - n
    table = sh.constrain(embedding, (None, 'act_embed'))
    x = jnp.take(table, jnp.pad(tokens, ((0, 0), (0, pad))), axis=0)
    x = x.reshape(b, n_segments, seg, c.d_model).swapaxes(0, 1)  # [S, B, seg, d]
    x_in = jnp.concatenate([x, jnp.broadcast_to(mem_embed, (n_segments, b, m, c.d_model))], axis=2)
    real = jnp.arange(n_segments * seg).reshape(n_segments, 1, seg) < (n if length is None else length)
    sids = jnp.concatenate([real, jnp.ones((n_segments, 1, m), bool)], axis=2).astype(jnp.int32)
    sids = jnp.broadcast_to(sids, (n_segments, b, rows))
    positions = jnp.broadcast_to(jnp.arange(rows, dtype=jnp.int32), (b, rows))

    stacked = stacked_matmul(c, sh.platform)

    def cell(p, w, h, mem_a, mem_z, first, sid):
      if a.memory:
        h = memory_read(h, w['wq'], mem_a, mem_z, first, stacked)
      h, _ = block.apply({'params': p}, h, positions, sid)
      if a.memory:
        mem_a, mem_z = memory_write(h[:, seg:], w, mem_a, mem_z, first, stacked)
      return h, mem_a, mem_z

    fresh = state is None
    if fresh:
      state = (jnp.zeros((c.n_layers, b, d_key, c.d_model), jnp.float32), jnp.zeros((c.n_layers, b, d_key),
                                                                                      jnp.float32))
    ys, state, steps = EXECUTORS[executor or a.executor](cell, layers, memory, x_in, sids, *state, a.remat, fresh)
    h = ys[:, :, :seg].swapaxes(0, 1).reshape(b, n_segments * seg, c.d_model)[:, :n]
    h = RMSNorm(c, name='final_norm')(sh.constrain(h, ('batch', 'seq', 'act_embed')))
    head = embedding.T if c.tie_embeddings else param(self, 'head', (c.d_model, c.vocab_size), ('embed', 'vocab'),
                                                       c.d_model ** -0.5, c)
    logits = dense(h, head, out_dtype=jnp.float32)
    return sh.constrain(logits, ('batch', 'seq', 'vocab')), state, steps


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per input token: the dense layers over segment + memory rows, the memory maths, the head."""
  c, a = cfg, cfg.armt
  rows = (a.segment_len + a.memory_tokens) / a.segment_len  # rows computed per input token
  attn = c.d_model * c.head_dim * (2 * c.n_heads + 2 * c.n_kv_heads)
  layer = attn + 3 * c.d_model * c.d_ff
  d_key = 6 * a.d_mem
  read = c.d_model * a.d_mem + d_key * (c.d_model + 1)  # per row
  write = (a.memory_tokens / (a.segment_len + a.memory_tokens)) * (
      c.d_model * (a.d_mem + c.d_model + 1) + 2 * d_key * (c.d_model + 1))  # per row, memory rows only
  scores = 2 * c.n_heads * c.head_dim * (a.segment_len + a.memory_tokens)
  per_row = c.n_layers * (layer + read + write + scores)
  del seq_len
  return 6.0 * (rows * per_row + c.d_model * c.vocab_size)


def generate(model: ARMT, params, prompt, max_new: int):
  """Greedy continuation of prompt [B, P] by `max_new` tokens, segment by segment: each completed segment is
  written into the memory once and never run again; the segment being filled (padded to a whole segment, so one
  compiled step serves every length) is rerun for each new token on the memory of the segments before it.
  Returns [B, P + max_new] tokens."""
  seg = model.cfg.armt.segment_len

  @jax.jit
  def run(tokens, state, length):
    logits, new_state, _ = model.apply({'params': params}, tokens, None, state, length, method=ARMT.forward)
    return logits, new_state

  @jax.jit
  def run_first(tokens, length):  # no memory yet
    logits, new_state, _ = model.apply({'params': params}, tokens, None, None, length, method=ARMT.forward)
    return logits, new_state

  def segment(tokens, state):
    r = tokens.shape[1]
    padded = jnp.pad(tokens, ((0, 0), (0, seg - r)))
    logits, new_state = run_first(padded, r) if state is None else run(padded, state, r)
    return logits[:, r - 1], new_state

  out = jnp.asarray(prompt, jnp.int32)
  state, last = None, None
  done = 0  # tokens in segments already written into the memory
  while out.shape[1] - done >= seg:
    last, state = segment(out[:, done:done + seg], state)
    done += seg
  for _ in range(max_new):
    if out.shape[1] > done:
      last, _ = segment(out[:, done:], state)
    out = jnp.concatenate([out, jnp.argmax(last, -1).astype(jnp.int32)[:, None]], axis=1)
    if out.shape[1] - done == seg:  # the segment is complete: write it into the memory
      last, state = segment(out[:, done:], state)
      done += seg
  return out
