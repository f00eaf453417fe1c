"""What the train step feeds an MoE model so its balance groups pool the right tokens, and the load metrics.

When a balance group (framework/models/moe_config.py) spans several gradient-accumulation micro-batches, the
micro-batch being differentiated needs the expert counts of the group's other micro-batches:

- running form (Megatron's global_aux_loss): the counts of the group's micro-batches seen so far in this step,
  carried through the accumulation scan and reset at each group's first micro-batch; micro-batch j of a group
  uses f = (counts of micro-batches 0..j) / (their routing slots), so only the group's last micro-batch sees the
  group's true f.
- exact form (moe.balance_exact): a forward-only pass routes every micro-batch first; each micro-batch then uses
  its group's true f. It costs that extra forward pass over the whole batch.

Groups that fit inside a micro-batch need nothing: the model computes their f from its own routing.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Plan:
  """balance(j, running) -> (the model's `balance` input for micro-batch j or None, the extra counts it used);
  advance(extra, stats) -> the running counts after micro-batch j; initial: the running counts before the first."""
  moe: Any
  slots_per_micro: float
  exact_extra: jax.Array | None
  initial: Any

  def balance(self, j, running):
    m = self.moe
    if m is None or not m.spans_micro_batches:
      return None, running
    if self.exact_extra is not None:
      slots = m.micros_per_group * self.slots_per_micro
      return {'extra_counts': self.exact_extra[j], 'slots': jnp.asarray(slots, jnp.float32)}, running
    pos = j % m.micros_per_group
    extra = jnp.where(pos == 0, jnp.zeros_like(running), running)
    slots = (pos + 1) * self.slots_per_micro
    return {'extra_counts': extra, 'slots': jnp.asarray(slots, jnp.float32)}, extra

  def advance(self, extra, stats):
    if self.moe is None or not self.moe.spans_micro_batches or self.exact_extra is not None:
      return extra
    return extra + jax.lax.stop_gradient(stats['moe_counts'])


def plan(moe, moe_layers: int, micro_batches: int, seq_len: int, route: Callable[[dict], dict],
         micro: dict) -> Plan:
  """The balance plan of one step. moe_layers: MoE layers in the model; route(micro_batch) -> the model's aux
  (a forward pass); micro: the step's micro-batches stacked on a leading axis. Only the exact form calls `route`,
  once per micro-batch."""
  if moe is None or not moe.spans_micro_batches:
    return Plan(moe, 0.0, None, ())
  rows = moe.batch_size // micro_batches
  slots_per_micro = float(rows * seq_len * moe.top_k)
  if moe.balance_exact:
    counts = jax.lax.stop_gradient(jax.lax.map(lambda mb: route(mb)['moe_counts'], micro))  # [n, L, E]
    per_group = counts.reshape(micro_batches // moe.micros_per_group, moe.micros_per_group, *counts.shape[1:])
    totals = jnp.repeat(per_group.sum(1), moe.micros_per_group, axis=0)
    return Plan(moe, slots_per_micro, totals - counts, jnp.zeros(counts.shape[1:], jnp.float32))
  return Plan(moe, slots_per_micro, None, jnp.zeros((moe_layers, moe.num_experts), jnp.float32))


def load_metrics(stats: dict) -> dict:
  """Derived MoE metrics from the step's summed statistics, per MoE layer: each expert's share of the routing
  slots ('moe_load'), the busiest expert's load over the mean ('moe_max_over_mean', 1 = perfectly even) and its
  worst layer, and with domain labels the domain-expert mutual information. Empty for a dense model."""
  if 'moe_counts' not in stats:
    return {}
  counts = stats['moe_counts']
  ratio = jnp.max(counts, axis=-1) / jnp.maximum(jnp.mean(counts, axis=-1), 1e-9)
  out = {'moe_load': counts / jnp.maximum(counts.sum(-1, keepdims=True), 1e-9), 'moe_max_over_mean': ratio,
         'moe_max_over_mean_worst': jnp.max(ratio)}
  if 'moe_domain_counts' in stats:
    out['moe_domain_mi'] = domain_expert_information(stats['moe_domain_counts'])
  return out


def domain_expert_information(domain_counts: jax.Array) -> jax.Array:
  """Mutual information (bits) between a routing slot's domain and its expert, per MoE layer, from counts
  [..., D, E]: 0 when every domain uses the experts alike, up to log2(min(D, E)) when each domain has its own."""
  joint = domain_counts / jnp.maximum(domain_counts.sum((-2, -1), keepdims=True), 1e-9)
  pd = joint.sum(-1, keepdims=True)
  pe = joint.sum(-2, keepdims=True)
  terms = jnp.where(joint > 0, joint * jnp.log2(jnp.maximum(joint, 1e-30) / jnp.maximum(pd * pe, 1e-30)), 0.0)
  return terms.sum((-2, -1))


def update_expert_bias(params, counts: jax.Array, rate: float):
  """Auxiliary-loss-free balancing (DeepSeek-V3): after each step, every MoE layer's expert bias moves by `rate`
  toward even load, b_i += rate * sign(mean load - load_i), from the step's routing counts [MoE layers, E]."""
  if not rate:
    return params

  def update(path, x):
    if getattr(path[-1], 'key', None) != 'expert_bias':
      return x
    return x + rate * jnp.sign(jnp.mean(counts, axis=-1, keepdims=True) - counts).reshape(x.shape)
  return jax.tree_util.tree_map_with_path(update, params)
