"""The `moe` config section: mixture-of-experts feed-forward layers and their load balancing.

`moe.num_experts = 0` (the default) keeps the dense model. Otherwise every `moe.every`-th layer's SwiGLU becomes
a routed mixture of `num_experts` SwiGLU experts (framework/models/moe.py).

Balance groups. The balance loss LBL = N_E * sum_i f_i * p_i (f_i: share of the routing slots that chose expert
i, no gradient; p_i: mean router probability of expert i) is computed per *group of sequences* and averaged over
the groups; which tokens a group pools is what the scope means, whatever device the code runs on:

  'sequence'  each sequence is a group (MaxText's per-sequence variant);
  'micro'     the sequences one data-parallel rank holds in one micro-batch (what Megatron and MaxText compute
              by default: f and p of a device's micro-batch);
  'global'    every sequence of the optimizer step: all ranks and all gradient-accumulation micro-batches;
  'group'     `moe.balance_group` sequences (the paper's "balance batch size"), to sweep between the others.

A group that spans several micro-batches is not fully routed until its last micro-batch has run. The running form
(default) uses the counts of the group's micro-batches seen so far in the step (Megatron's global_aux_loss);
`moe.balance_exact` first routes every micro-batch in a forward-only pass and uses the group's true f.
"""
from __future__ import annotations

import dataclasses
import math

import ml_collections

from framework.config_checks import Context, fail, non_negative, one_of, positive
from framework.mesh import shard_count

ROUTERS = ('softmax', 'sigmoid')
SCOPES = ('sequence', 'micro', 'global', 'group')
DISPATCHES = ('dropless', 'capacity')
GMM_IMPLS = ('auto', 'ragged_dot', 'pallas', 'blocked')


def defaults() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      num_experts=0,             # 0: dense model (no MoE layers)
      top_k=2,
      every=1,                   # MoE in layers every-1, 2*every-1, ...: 1 = every layer
      d_ff_expert=0,             # hidden width of one expert; 0: model.d_ff
      shared_experts=0,          # always-on experts (one SwiGLU of shared_experts * d_ff_expert) beside the routed
      router='softmax',          # softmax | sigmoid (scores normalised over the chosen k, as DeepSeek-V3)
      normalize_top_k=True,      # softmax router: renormalise the k chosen probabilities to sum to 1
      router_z_loss=1e-3,        # weight of mean(logsumexp(router logits)^2), summed over MoE layers
      balance_weight=1e-2,       # weight of the balance loss (mean over MoE layers)
      balance_scope='global',    # sequence | micro | global | group
      balance_group=0,           # sequences per balance group, for balance_scope='group'
      balance_exact=False,       # groups spanning micro-batches: exact f from a forward-only routing pass
      balance_micro_weight=0.0,  # an extra 'micro'-scope balance term with its own weight (the paper's + 1%)
      dispatch='dropless',       # dropless | capacity
      capacity_factor=1.25,      # capacity path: slots per expert per sequence = ceil(factor * seq * k / E)
      gmm_impl='auto',           # dropless matmuls: auto | ragged_dot | pallas | blocked
      gmm_block_rows=128,        # 'blocked': rows per block (each expert's rows padded to a multiple)
      bias_update_rate=0.0,      # > 0: auxiliary-loss-free balancing (DeepSeek-V3): per-expert router biases,
                                 # used only to choose experts, moved by this much per step toward even load
  ))


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """The moe section resolved against the train section and the mesh, as a hashable value for flax modules.

  balance_rows: sequences per balance group inside one micro-batch (the whole micro-batch when groups span
    several); groups_per_step: balance groups in one optimizer step; micro_rows: sequences per data-parallel
    rank per micro-batch; micros_per_group: micro-batches a group spans (1 when it fits in one); batch_size:
  sequences per optimizer step.
  """
  num_experts: int
  top_k: int
  every: int
  d_ff: int
  shared_d_ff: int
  router: str
  normalize_top_k: bool
  router_z_loss: float
  balance_weight: float
  balance_micro_weight: float
  balance_exact: bool
  dispatch: str
  capacity_factor: float
  gmm_impl: str
  gmm_block_rows: int
  balance_rows: int
  groups_per_step: int
  micro_rows: int
  micros_per_group: int
  batch_size: int
  bias_update_rate: float = 0.0
  num_domains: int = 0

  @property
  def spans_micro_batches(self) -> bool:
    return self.micros_per_group > 1

  @classmethod
  def from_config(cls, cfg, batch_shards: int, num_domains: int = 0) -> 'MoEConfig | None':
    """None for a dense model. `batch_shards`: how many data-parallel ranks the batch is split over;
    `num_domains`: domain labels the data carries (0: none), for per-domain routing statistics."""
    m = cfg.moe
    if not m.num_experts:
      return None
    group = balance_group_size(cfg, batch_shards)
    micro = cfg.train.batch_size // cfg.train.micro_batches
    d_ff = m.d_ff_expert or cfg.model.d_ff
    return cls(num_experts=m.num_experts, top_k=m.top_k, every=m.every, d_ff=d_ff,
               shared_d_ff=m.shared_experts * d_ff, router=m.router, normalize_top_k=m.normalize_top_k,
               router_z_loss=m.router_z_loss, balance_weight=m.balance_weight,
               balance_micro_weight=m.balance_micro_weight, balance_exact=m.balance_exact, dispatch=m.dispatch,
               capacity_factor=m.capacity_factor, gmm_impl=m.gmm_impl, gmm_block_rows=m.gmm_block_rows,
               balance_rows=min(group, micro), groups_per_step=cfg.train.batch_size // group,
               micro_rows=micro // batch_shards, micros_per_group=max(group // micro, 1),
               batch_size=cfg.train.batch_size, bias_update_rate=m.bias_update_rate, num_domains=num_domains)

  def capacity(self, seq_len: int) -> int:
    """Slots per expert per sequence on the capacity path."""
    return max(1, math.ceil(self.capacity_factor * seq_len * self.top_k / self.num_experts))


def balance_group_size(cfg, batch_shards: int) -> int:
  """Sequences per balance group for the configured scope."""
  m, t = cfg.moe, cfg.train
  micro = t.batch_size // t.micro_batches
  return {'sequence': 1, 'micro': micro // batch_shards, 'global': t.batch_size,
          'group': m.balance_group}[m.balance_scope]


def structure(cfg) -> dict:
  """The moe fields that fix the parameters' shapes (a config saved before the section existed is dense)."""
  m = cfg.get('moe') or {'num_experts': 0}
  if not m['num_experts']:
    return {'moe.num_experts': 0}
  return {'moe.num_experts': m['num_experts'], 'moe.every': m['every'], 'moe.d_ff_expert': m['d_ff_expert'],
          'moe.shared_experts': m['shared_experts'], 'moe.expert_bias': bool(m.get('bias_update_rate', 0.0))}


def validate(cfg, ctx: Context) -> None:
  m = cfg.moe
  non_negative(m, 'moe', 'num_experts', 'd_ff_expert', 'shared_experts', 'router_z_loss', 'balance_weight',
               'balance_micro_weight', 'balance_group', 'bias_update_rate')
  if not m.num_experts:
    return
  positive(m, 'moe', 'top_k', 'every', 'capacity_factor', 'gmm_block_rows')
  one_of('moe.router', m.router, ROUTERS)
  one_of('moe.balance_scope', m.balance_scope, SCOPES)
  one_of('moe.dispatch', m.dispatch, DISPATCHES)
  one_of('moe.gmm_impl', m.gmm_impl, GMM_IMPLS)
  if m.top_k > m.num_experts:
    fail('moe.top_k', f'{m.top_k} is more than moe.num_experts={m.num_experts}')
  if cfg.model.n_layers % m.every:
    fail('moe.every', f'{m.every} must divide model.n_layers={cfg.model.n_layers} (the layers are stacked in '
         'groups of `every`, the last of each an MoE)')
  if m.balance_scope == 'group' and not m.balance_group:
    fail('moe.balance_group', "balance_scope='group' needs moe.balance_group > 0 (sequences per group)")
  if m.balance_scope != 'group' and m.balance_group:
    fail('moe.balance_group', f"is only read with balance_scope='group' (got scope {m.balance_scope!r}); set "
         "the scope to 'group' or balance_group to 0")
  for field, value, name in (('moe.num_experts', m.num_experts, 'expert'),
                             ('moe.d_ff_expert', m.d_ff_expert or cfg.model.d_ff, 'mlp')):
    count, axes = shard_count(ctx.rules, ctx.sizes, name)
    if value % count:
      fail(field, f'{value} is not divisible by the {count} shards of logical axis {name!r} (mesh axes {axes} '
           'via mesh.axis_rules); change the size, the mesh sizes or the rule')
  batch_shards, _ = shard_count(ctx.rules, ctx.sizes, 'batch')
  t = cfg.train
  micro = t.batch_size // t.micro_batches
  group = balance_group_size(cfg, batch_shards)
  fits = group <= micro and micro % group == 0
  spans = group > micro and group % micro == 0 and t.batch_size % group == 0
  if not (fits or spans):
    fail('moe.balance_group', f'a balance group of {group} sequences must divide the micro-batch '
         f'(train.batch_size / train.micro_batches = {micro}) or be a multiple of it that divides '
         f'train.batch_size={t.batch_size}')
