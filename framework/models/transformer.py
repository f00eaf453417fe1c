"""Decoder-only transformer (Llama-style): RMSNorm, RoPE, grouped-query attention, SwiGLU.

Layers are stacked on a leading 'layers' axis and run with nn.scan, so compile time does not grow with depth and
later code (kernels, the diagonal scheduler) can address one layer by index. model.scan_unroll sets how many
layers one loop iteration runs; the parameters stay stacked whatever it is, so checkpoints do not depend on it.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from framework.mesh import Sharder
from framework.models import attention as attention_lib
from framework.models import moe as moe_lib
from framework.models.dense import dense
from framework.models.layers import ModelConfig, RMSNorm, SwiGLU, param, rope, stacked_matmul
from framework.models.moe import MoE

REMAT_POLICIES = {
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Attention(nn.Module):
  """Grouped-query self-attention. `qkv` and `out` are its two halves around the attention itself, so the
  inference engine (framework/inference/forward.py) runs the same projections against its paged KV cache."""
  cfg: ModelConfig
  sharder: Sharder

  def setup(self):
    c = self.cfg
    self.wq = param(self, 'wq', (c.d_model, c.n_heads, c.head_dim), ('embed', 'heads', 'head_dim'), c.init_std, c)
    self.wk = param(self, 'wk', (c.d_model, c.n_kv_heads, c.head_dim), ('embed', 'kv_heads', 'head_dim'),
                    c.init_std, c)
    self.wv = param(self, 'wv', (c.d_model, c.n_kv_heads, c.head_dim), ('embed', 'kv_heads', 'head_dim'),
                    c.init_std, c)
    self.wo = param(self, 'wo', (c.n_heads, c.head_dim, c.d_model), ('heads', 'head_dim', 'embed'),
                    c.init_std / (2 * c.n_layers) ** 0.5, c)

  def _mm(self, x, w, n_in=1):
    return dense(x, w, n_in=n_in, stacked=stacked_matmul(self.cfg, self.sharder.platform))

  def qkv(self, x, positions):
    """x [b, s, d] -> rotated q [b, s, heads, hd] and k, v [b, s, kv_heads, hd]."""
    c, sh = self.cfg, self.sharder
    q = sh.constrain(self._mm(x, self.wq), attention_lib.ACT_NAMES)
    k = sh.constrain(self._mm(x, self.wk), attention_lib.KV_NAMES)
    v = sh.constrain(self._mm(x, self.wv), attention_lib.KV_NAMES)
    return rope(q, positions, c.rope_theta), rope(k, positions, c.rope_theta), v

  def out(self, o):
    """The attention output [b, s, heads, hd] -> [b, s, d]."""
    return self._mm(self.sharder.constrain(o, attention_lib.ACT_NAMES), self.wo, n_in=2)

  def __call__(self, x, positions, segment_ids):
    q, k, v = self.qkv(x, positions)
    c, sh = self.cfg, self.sharder
    return self.out(attention_lib.attention(q, k, v, segment_ids=segment_ids, impl=c.attention_impl, sharder=sh))


class Block(nn.Module):
  """One pre-norm decoder layer, its feed-forward block a SwiGLU or (use_moe) an MoE. Returns (x, MoE statistics
  or None) so nn.scan can carry x and stack the statistics."""
  cfg: ModelConfig
  sharder: Sharder
  use_moe: bool = False

  @nn.compact
  def __call__(self, x, positions, segment_ids, extra_counts=None, slots=None, domains=None):
    act = ('batch', 'seq', 'act_embed')
    h = Attention(self.cfg, self.sharder, name='attn')(RMSNorm(self.cfg, name='attn_norm')(x), positions,
                                                       segment_ids)
    x = self.sharder.constrain(x + h, act)
    normed = RMSNorm(self.cfg, name='mlp_norm')(x)
    if self.use_moe:
      h, stats = MoE(self.cfg, self.sharder, name='moe')(normed, extra_counts, slots, domains)
    else:
      h, stats = SwiGLU(self.cfg, self.sharder, name='mlp')(normed), None
    return self.sharder.constrain(x + h, act), stats


class MoEGroup(nn.Module):
  """moe.every consecutive layers: every - 1 dense ones (stacked) and then one MoE layer."""
  cfg: ModelConfig
  sharder: Sharder

  @nn.compact
  def __call__(self, x, positions, segment_ids, extra_counts, slots, domains):
    c, sh = self.cfg, self.sharder
    block = remat_block(c)
    dense_layers = nn.scan(block, variable_axes={'params': 0, 'intermediates': 0}, split_rngs={'params': True},
                           in_axes=(nn.broadcast, nn.broadcast), length=c.moe.every - 1,
                           unroll=scan_unroll(c, sh, c.moe.every - 1),
                           metadata_params={nn.PARTITION_NAME: 'layers'})
    x, _ = dense_layers(c, sh, name='dense')(x, positions, segment_ids)
    moe_block = remat_block(c, MoEBlock)(c, sh, name='moe_block')
    return moe_block(x, positions, segment_ids, extra_counts, slots, domains)


class MoEBlock(Block):
  use_moe: bool = True


def remat_block(cfg: ModelConfig, block=Block):
  """The decoder layer class under model.remat_policy (the dense stack, the MoE groups and ARMT's cells)."""
  if cfg.remat_policy == 'none':
    return block
  return nn.remat(block, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=False)


class Transformer(nn.Module):
  """tokens, positions, segment_ids [batch, seq] int32 -> (logits [batch, seq, vocab] f32, aux dict).

  `aux` holds per-call statistics that the train step sums over micro-batches (empty for the dense model; MoE
  layers add expert counts there).
  """
  cfg: ModelConfig
  sharder: Sharder

  @nn.compact
  def __call__(self, tokens, positions, segment_ids, balance=None, domains=None):
    """balance: for MoE groups spanning micro-batches, {'extra_counts': [MoE layers, E], 'slots': scalar} (see
    framework/models/moe.py); domains [batch, seq] int32: per-token domain labels for routing statistics."""
    c, sh = self.cfg, self.sharder
    embedding = param(self, 'embedding', (c.vocab_size, c.d_model), ('vocab', 'embed'), c.init_std, c)
    # Gather from a table laid out like the activations (vocab whole): a gather from a vocab-sharded table
    # would make GSPMD replicate and re-split its output.
    table = sh.constrain(embedding, (None, 'act_embed'))
    x = sh.constrain(jnp.take(table, tokens, axis=0), ('batch', 'seq', 'act_embed'))

    if c.moe is None:
      layers = nn.scan(remat_block(c), variable_axes={'params': 0}, split_rngs={'params': True},
                       in_axes=(nn.broadcast, nn.broadcast), length=c.n_layers, unroll=scan_unroll(c, sh, c.n_layers),
                       metadata_params={nn.PARTITION_NAME: 'layers'})
      x, _ = layers(c, sh, name='layers')(x, positions, segment_ids)
      aux = {}
    else:
      x, aux = self._moe_layers(x, positions, segment_ids, balance, domains)
    x = RMSNorm(c, name='final_norm')(x)

    if c.tie_embeddings:
      head = embedding.T
    else:
      head = param(self, 'head', (c.d_model, c.vocab_size), ('embed', 'vocab'), c.d_model ** -0.5, c)
    logits = dense(x, head, out_dtype=jnp.float32)
    return sh.constrain(logits, ('batch', 'seq', 'vocab')), aux

  def _moe_layers(self, x, positions, segment_ids, balance, domains):
    c, sh, m = self.cfg, self.sharder, self.cfg.moe
    n_groups = c.n_layers // m.every
    b, s = positions.shape
    if balance is None:  # f from this call's own routing
      balance = {'extra_counts': jnp.zeros((n_groups, m.num_experts), jnp.float32),
                 'slots': jnp.asarray(b * s * m.top_k, jnp.float32)}
    if domains is None:
      domains = jnp.zeros((b, s), jnp.int32)
    group = MoEGroup if m.every > 1 else remat_block(c, MoEBlock)
    layers = nn.scan(group, variable_axes={'params': 0, 'intermediates': 0}, split_rngs={'params': True},
                     in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast, nn.broadcast), length=n_groups,
                     unroll=scan_unroll(c, sh, n_groups), metadata_params={nn.PARTITION_NAME: 'layers'})
    x, stats = layers(c, sh, name='layers')(x, positions, segment_ids, balance['extra_counts'], balance['slots'],
                                            domains)
    return x, moe_lib.aux_from_layers(stats, m)


def scan_unroll(cfg: ModelConfig, sharder: Sharder, length: int) -> int:
  """Layers per loop iteration: model.scan_unroll, or for 0 (auto) every layer on CPU and one elsewhere.

  On XLA's CPU backend the rolled loop slices each layer's weights out of the stacks and writes the saved
  activations and weight gradients back in, which cost lm_small's step 4-9% (README, "Where the CPU step's time
  went"); on TPU and GPU the loop keeps compile time flat in depth, which matters more. The platform is the
  mesh's, not the default backend's, so a model compiled ahead of time for a TPU from a CPU host gets the loop.
  """
  if cfg.scan_unroll:
    return min(cfg.scan_unroll, max(length, 1))
  return max(length, 1) if sharder.platform == 'cpu' else 1


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token: 6 x the matmul parameters a token uses (an MoE layer: its router, k routed experts
  and the shared ones) plus causal-free attention scores (PaLM appendix B)."""
  attn = cfg.d_model * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
  mlp = 3 * cfg.d_model * cfg.d_ff
  mlp_total = cfg.n_layers * mlp
  if cfg.moe is not None:
    m = cfg.moe
    n_moe = cfg.n_layers // m.every
    active = cfg.d_model * m.num_experts + 3 * cfg.d_model * (m.top_k * m.d_ff + m.shared_d_ff)
    mlp_total = (cfg.n_layers - n_moe) * mlp + n_moe * active
  matmul_params = cfg.n_layers * attn + mlp_total + cfg.d_model * cfg.vocab_size
  attention_scores = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len
  return 6.0 * matmul_params + attention_scores


def num_params(params) -> int:
  return int(sum(x.size for x in jax.tree.leaves(params)))
