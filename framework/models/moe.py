"""Mixture-of-experts feed-forward block: router, routed SwiGLU experts, optional shared experts, balance losses.

The layer returns its output and a dict of per-micro-batch statistics. Loss terms in it are *mean-normalised*:
summed over the step's micro-batches they give the step's mean value (the train step scales them by the step's
token count, because it divides every summed loss by that count). Counts are plain sums.

Balance loss of a group of sequences g: LBL_g = N_E * sum_i f_gi * p_gi, f_gi the share of the group's routing
slots (tokens x k) given to expert i (no gradient), p_gi the mean over the group's tokens of expert i's router
probability; the step's loss is the mean over its groups. Because p_g is a mean over tokens, the loss splits
into one term per sequence, sum_b N_E * sum_i f_{g(b),i} * probsum_bi / (tokens per group * groups), so a
micro-batch only needs its groups' f: computed from its own routing when its groups lie inside it, and passed
in (`extra_counts`, `slots`) when a group spans micro-batches (see framework/models/moe_config.py).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from framework.mesh import Sharder
from framework.models import moe_dispatch
from framework.models.dense import dense
from framework.models.layers import ModelConfig, SwiGLU, param


def route(logits: jax.Array, moe, bias: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Router logits [..., E] (f32) -> (expert ids [..., k], combine weights [..., k], balance probabilities [..., E]).

  softmax: weights are the chosen probabilities (renormalised over the k if moe.normalize_top_k); sigmoid: each
  expert's score is sigmoid(logit), weights are the chosen scores over their sum, and the balance probabilities
  the scores normalised over all experts (DeepSeek-V3). `bias` [E] (auxiliary-loss-free balancing) is added to
  the scores only to choose the experts; the weights are the unbiased scores.
  """
  if moe.router == 'softmax':
    scores = probs = jax.nn.softmax(logits, axis=-1)
  else:
    scores = jax.nn.sigmoid(logits)
    probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
  _, idx = jax.lax.top_k(scores if bias is None else scores + bias, moe.top_k)
  weights = jnp.take_along_axis(scores, idx, axis=-1)
  if moe.router == 'sigmoid' or moe.normalize_top_k:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return idx, weights, probs


def group_balance(counts: jax.Array, probsum: jax.Array, rows: int, groups_per_step: int, seq_len: int,
                  top_k: int) -> jax.Array:
  """This micro-batch's share of the step's mean balance loss, for groups of `rows` consecutive sequences inside it.

  counts, probsum [b, E]: per sequence, routing slots per expert and summed router probabilities. A batch that
  does not split into such groups (initialisation's dummy row, generation) is one group.
  """
  b, e = counts.shape
  if b % rows:
    rows = b
  f = counts.reshape(b // rows, rows, e).sum(1) / (rows * seq_len * top_k)
  p = probsum.reshape(b // rows, rows, e).sum(1)
  return e * jnp.sum(jax.lax.stop_gradient(f) * p) / (rows * seq_len * groups_per_step)


def spanning_balance(f: jax.Array, probsum: jax.Array, group_tokens: int, groups_per_step: int) -> jax.Array:
  """As group_balance, for a micro-batch inside one group that spans micro-batches, whose f [E] is given."""
  e = f.shape[-1]
  return e * jnp.sum(jax.lax.stop_gradient(f) * probsum.sum(0)) / (group_tokens * groups_per_step)


class MoE(nn.Module):
  """x [b, s, d] -> (y [b, s, d], stats). `extra_counts` [E] and `slots` (scalars of the step's balance group,
  used when groups span micro-batches): f = (extra_counts + this micro-batch's counts) / slots."""
  cfg: ModelConfig
  sharder: Sharder

  @nn.compact
  def __call__(self, x, extra_counts, slots, domains=None):
    c, m, sh = self.cfg, self.cfg.moe, self.sharder
    e = m.num_experts
    w_router = param(self, 'router', (c.d_model, e), ('embed', None), c.init_std, c)
    weights = {
        'wi_gate': param(self, 'wi_gate', (e, c.d_model, m.d_ff), moe_dispatch.WEIGHT_NAMES['wi_gate'],
                         c.init_std, c),
        'wi_up': param(self, 'wi_up', (e, c.d_model, m.d_ff), moe_dispatch.WEIGHT_NAMES['wi_up'], c.init_std, c),
        'wo': param(self, 'wo', (e, m.d_ff, c.d_model), moe_dispatch.WEIGHT_NAMES['wo'],
                    c.init_std / (2 * c.n_layers) ** 0.5, c),
    }
    # The router in f32 whatever the compute dtype: top-k ties and small logit gaps decide where tokens go.
    logits = dense(x.astype(jnp.float32), w_router.astype(jnp.float32))
    logits = sh.constrain(logits, ('batch', 'seq', None))
    bias = None
    if m.bias_update_rate:
      init = nn.with_logical_partitioning(nn.initializers.zeros, (None,))
      bias = jax.lax.stop_gradient(self.param('expert_bias', init, (e,), jnp.float32))
    idx, gates, probs = route(logits, m, bias)
    self.sow('intermediates', 'router_probs', probs)  # kept only when the caller asks (tests, analysis)
    capacity = m.capacity(x.shape[1]) if m.dispatch == 'capacity' else 0
    positions = moe_dispatch.capacity_positions(idx, e) if capacity else None  # for dispatch and the drop count
    y = moe_dispatch.expert_ffn(x, idx, gates, weights, moe=m, sharder=sh, platform=sh.platform,
                                capacity=capacity, positions=positions)
    if m.shared_d_ff:
      y = y + SwiGLU(c, sh, d_ff=m.shared_d_ff, name='shared')(x)
    y = sh.constrain(y.astype(x.dtype), ('batch', 'seq', 'act_embed'))
    return y, self._stats(logits, idx, probs, capacity, positions, extra_counts, slots, domains)

  def _stats(self, logits, idx, probs, capacity, positions, extra_counts, slots, domains):
    m = self.cfg.moe
    _, s, e = probs.shape
    choice = jax.nn.one_hot(idx, e, dtype=jnp.float32)  # [b, s, k, E]
    counts = choice.sum((1, 2))  # [b, E]
    probsum = probs.sum(1)
    step_tokens = m.batch_size * s
    if m.spans_micro_batches:
      f = (extra_counts + counts.sum(0)) / slots
      balance = spanning_balance(f, probsum, m.balance_rows * m.micros_per_group * s, m.groups_per_step)
    else:
      balance = group_balance(counts, probsum, m.balance_rows, m.groups_per_step, s, m.top_k)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    stats = {
        'counts': counts.sum(0),
        'balance': balance,
        'router_z': jnp.sum(jnp.square(log_z)) / step_tokens,
        'entropy': -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30))) / step_tokens,
    }
    if m.balance_micro_weight:
      stats['balance_micro'] = group_balance(counts, probsum, m.micro_rows, m.batch_size // m.micro_rows, s,
                                             m.top_k)
    if capacity:
      stats['dropped'] = jnp.sum(positions >= capacity).astype(jnp.float32)
    if m.num_domains:
      stats['domain_counts'] = jnp.einsum('bsd,bske->de', jax.nn.one_hot(domains, m.num_domains,
                                                                         dtype=jnp.float32), choice)
    return stats


def aux_from_layers(stats: dict, moe) -> dict:
  """Per-MoE-layer statistics (stacked on a leading layer axis) -> the model's `aux`: the weighted loss term the
  train step adds ('aux_loss', mean-normalised), and what it reports."""
  aux = {
      'aux_loss': moe.balance_weight * jnp.mean(stats['balance']) + moe.router_z_loss * jnp.sum(stats['router_z']),
      'moe_balance': jnp.mean(stats['balance']),
      'moe_router_z': jnp.sum(stats['router_z']),
      'moe_counts': stats['counts'],
      'moe_entropy': stats['entropy'],
  }
  if 'balance_micro' in stats:
    aux['aux_loss'] = aux['aux_loss'] + moe.balance_micro_weight * jnp.mean(stats['balance_micro'])
    aux['moe_balance_micro'] = jnp.mean(stats['balance_micro'])
  if 'dropped' in stats:
    aux['moe_dropped'] = stats['dropped']
  if 'domain_counts' in stats:
    aux['moe_domain_counts'] = stats['domain_counts']
  return aux
