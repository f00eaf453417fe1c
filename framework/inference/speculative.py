"""Batch speculative decoding on the engine: a small draft model proposes k tokens per sequence, the target
verifies all of them in one batched pass, and each sequence keeps as many as it accepts.

    engine = Engine(cfg, params, draft=(draft_cfg, draft_params))   # inference.speculative_tokens = k

A round (an engine step whose running sequences are all decoding; a step with prefill chunks runs as usual):
1. The draft runs k decode steps over the slots, each feeding the previous proposal: d_1..d_k per sequence,
   with q_i, the draft's sampling distribution (the request's temperature, top-k, top-p) for d_i.
2. The target runs once over k + 1 tokens per sequence, [last, d_1..d_k] at their own positions, through the
   paged prefill path: logits for every position, its K and V written into the sequence's own pages.
3. Speculative sampling (Leviathan et al.; Chen et al.) per sequence: accept d_i while u_i < p_{i-1}(d_i) /
   q_i(d_i); at the first rejection sample from norm(max(0, p - q)); if all are accepted, one bonus token from
   p_k. The output distribution is the target's; at temperature 0 both p and q are one-hot and the rule accepts
   exactly while the draft's token is the target's argmax, so greedy output equals non-speculative output.

Realignment ("Batch Speculative Decoding Done Right") comes free with the paged cache: every sequence has its own
page table, positions and length, so a sequence that accepted a tokens just sets its computed length to the
last accepted position; the K and V written for its rejected tokens lie beyond it and are overwritten by the next
tokens. No repadding, no shifting of other sequences. The draft's cache uses the same page ids (a second,
smaller set of K/V arrays over the same pool); it mirrors every non-speculative step, and after a round it holds
every accepted token except a fully accepted d_k, which one extra draft step feeds.

Sampled tokens use their own random streams (the draft's proposal, the accept test, the residual), keyed by the
request's seed and the token's index, so with speculation a sampled request is reproducible for the same
sequence of rounds, and follows the target's distribution; it is not the same sample as without speculation.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from framework.inference import forward, kv_cache, loading
from framework.inference.kv_cache import bucket
from framework.inference.sampling import filtered_logprobs
from framework.inference.scheduler import now
from framework.mesh import Sharder

_DRAFT, _ACCEPT, _RESIDUAL = 1, 2, 3  # random streams of a token index


def _keys(seeds, counters, purpose: int):
  return jax.vmap(lambda s, c: jax.random.fold_in(jax.random.fold_in(jax.random.key(s), c), purpose))(
      seeds, counters)


def draft_sample(logits, smp):
  """A draft proposal per row and the distribution it came from: (tokens [S], log q [S, V])."""
  logq = filtered_logprobs(logits, smp['temperature'], smp['top_k'], smp['top_p'])
  tokens = jax.vmap(jax.random.categorical)(_keys(smp['seeds'], smp['counters'], _DRAFT), logq)
  return tokens.astype(jnp.int32), logq


def accept(target_logits, drafts, logq, room, smp):
  """The speculative sampling rule per row.

  target_logits [S, K+1, V] at [last, d_1..d_K]; drafts [S, K]; logq [S, K, V]; room [S]: at most this many
  drafts count (the output cap, the context); smp: the rows' sampling fields, counters = the index of d_1.
  Returns (accepted [S], tokens [S, K+1]: d_1..d_a then the next token, logprobs [S, K+1] under the target's own
  distribution).
  """
  s, k1, vocab = target_logits.shape
  k = k1 - 1
  rep = lambda x: jnp.repeat(x, k1)
  logp = filtered_logprobs(target_logits.reshape(s * k1, vocab), rep(smp['temperature']), rep(smp['top_k']),
                           rep(smp['top_p'])).reshape(s, k1, vocab)
  at = lambda lp, tok: jnp.take_along_axis(lp, tok[..., None], axis=-1)[..., 0]
  ratio = at(logp[:, :k], drafts) - at(logq, drafts)  # log p_{i-1}(d_i) - log q_i(d_i)
  index = jnp.arange(k)
  u = jax.vmap(lambda c: jax.vmap(jax.random.uniform)(_keys(smp['seeds'], smp['counters'] + c, _ACCEPT)),
               out_axes=1)(index)
  ok = (jnp.log(u) < ratio) & (index[None] < room[:, None])
  accepted = jnp.cumprod(ok, axis=1).sum(axis=1).astype(jnp.int32)
  rows = jnp.arange(s)
  p = jnp.exp(logp[rows, accepted])
  q = jnp.exp(logq[rows, jnp.minimum(accepted, k - 1)])
  rejected = accepted < room
  residual = jnp.where(rejected[:, None], jnp.maximum(p - q, 0.0), p)
  residual = jnp.where(residual.sum(-1, keepdims=True) > 0, residual, p)  # p == q up to rounding
  keys = _keys(smp['seeds'], smp['counters'] + accepted, _RESIDUAL)
  nxt = jax.vmap(jax.random.categorical)(keys, jnp.log(residual)).astype(jnp.int32)
  tokens = jnp.where(jnp.arange(k1)[None] < accepted[:, None], jnp.pad(drafts, ((0, 0), (0, 1))), 0)
  tokens = tokens.at[rows, accepted].set(nxt)
  logprobs = at(jax.nn.log_softmax(target_logits, axis=-1), tokens)
  return accepted, tokens, logprobs


@functools.lru_cache(maxsize=16)
def _propose_fn(model_cfg, sharder: Sharder, impl: str):
  cfg = forward.inference_model_config(model_cfg)
  attend = forward.Attend(forward.resolve_attention(impl, sharder.platform), sharder)

  def propose(params, cache, batch):
    cache, x = forward.run_layers(cfg, sharder, attend, params, cache, {'dec': batch['dec']})
    tokens, logq = draft_sample(forward.head_logits(cfg, params, x), batch['sample'])
    return cache, tokens, logq

  return jax.jit(propose, out_shardings=(sharder.sharding(kv_cache.cache_names()), None, None), donate_argnums=(1,))


@functools.lru_cache(maxsize=16)
def _verify_fn(model_cfg, sharder: Sharder, impl: str):
  cfg = forward.inference_model_config(model_cfg)
  attend = forward.Attend(forward.resolve_attention(impl, sharder.platform), sharder)

  def verify(params, cache, batch, last, drafts, logq, room):
    pre = dict(batch['pre'], tokens=jnp.concatenate([last[:, None], drafts], axis=1))
    cache, x = forward.run_layers(cfg, sharder, attend, params, cache, {'pre': pre})
    s, k1 = pre['tokens'].shape
    logits = forward.head_logits(cfg, params, x).reshape(s, k1, -1)
    return (cache,) + accept(logits, drafts, logq, room, batch['sample'])

  return jax.jit(verify, out_shardings=(sharder.sharding(kv_cache.cache_names()), None, None, None),
                 donate_argnums=(1,))


@dataclasses.dataclass
class Stats:
  rounds: int = 0      # target verification passes
  rows: int = 0        # sequences verified, over all rounds
  proposed: int = 0    # draft tokens that could count (within each sequence's room)
  accepted: int = 0
  emitted: int = 0     # tokens the rounds added to outputs (accepted + one per row, less any past a stop)

  def to_json(self) -> dict:
    return {'speculative_rounds': self.rounds, 'draft_tokens_proposed': self.proposed,
            'draft_tokens_accepted': self.accepted,
            'acceptance_rate': self.accepted / self.proposed if self.proposed else None,
            'tokens_per_target_pass': self.emitted / self.rows if self.rows else None}


def draft_config(cfg, draft_cfg, num_devices: int, backend: str):
  """The draft's config as it is served beside the target: on the target's mesh, with its context and engine
  settings; validated, and checked against the target. Raises ValueError naming the field."""
  from framework import config as config_lib  # pylint: disable=g-import-not-at-top  (config imports inference)
  draft = draft_cfg.copy_and_resolve_references()
  draft.mesh = cfg.mesh
  draft.model.max_seq_len = cfg.model.max_seq_len
  draft.data.seq_len = min(draft.data.seq_len, cfg.model.max_seq_len)
  draft.inference = cfg.inference
  config_lib.validate(draft, num_devices=num_devices, backend=backend)
  check_pair(cfg, draft)
  return draft


def check_pair(cfg, draft_cfg) -> None:
  """Raises ValueError naming the field when the draft cannot propose for the target."""
  if draft_cfg.model.vocab_size != cfg.model.vocab_size:
    raise ValueError(f'draft model.vocab_size: {draft_cfg.model.vocab_size} but the target has '
                     f'{cfg.model.vocab_size}; a draft must share the target\'s tokenizer and vocabulary')
  for name, c in (('', cfg), ('draft ', draft_cfg)):
    if c.armt.segment_len:
      raise ValueError(f'{name}armt.segment_len: speculative decoding serves the dense and MoE decoders, not the '
                       'recurrent-memory model; serve it without a draft')


class Speculator:
  """The draft side of an engine: its parameters and K/V pages, the round, the statistics."""

  def __init__(self, engine, draft_cfg, draft_params):
    check_pair(engine.cfg, draft_cfg)
    self.engine, self.k = engine, engine.icfg.speculative_tokens
    sharder = engine.sharder
    self.model_cfg = loading.model_config(draft_cfg)
    shardings = jax.tree.map(lambda a: a.sharding, loading.abstract_params(draft_cfg, sharder))
    self.params = forward.serving_params(self.model_cfg, sharder, jax.device_put(draft_params, shardings))
    self.cache = kv_cache.init_cache(self.model_cfg, engine.pool.num_pages, engine.page_size,
                                     sharder.sharding(kv_cache.cache_names()))
    impl = engine.icfg.attention_impl
    self._mirror = forward.make_step(self.model_cfg, sharder, impl)
    self._propose = _propose_fn(self.model_cfg, sharder, impl)
    self._verify = _verify_fn(engine.model_cfg, sharder, impl)
    self.stats = Stats()

  def mirror(self, batch: dict) -> None:
    """Runs the target's non-speculative step batch through the draft, so its pages hold the same tokens."""
    self.cache, _, _ = self._mirror(self.params, self.cache, batch)

  def round(self, decodes) -> list:
    e, k = self.engine, self.k
    ps, slots = e.page_size, e.icfg.slots
    room = np.zeros(slots, np.int32)      # drafts that may count: the output cap, the context, free pages
    base = np.zeros(slots, np.int32)      # the last token's position, n - 1
    last = np.zeros(slots, np.int32)
    active = np.zeros(slots, bool)
    for seq in decodes:
      n = len(seq.tokens)
      want = max(0, min(k, seq.max_new - len(seq.generated) - 1, e.max_seq_len - n - 1))
      missing = e.scheduler.pages_needed(n + want) - len(seq.pages)
      if missing > 0:  # lookahead pages, never by preemption: with fewer free, fewer drafts count
        seq.pages += e.pool.allocate(min(missing, e.pool.free)) or []
      i = seq.slot
      room[i], base[i], last[i], active[i] = min(want, len(seq.pages) * ps - n), n - 1, seq.tokens[-1], True
    width = bucket(max(len(seq.pages) for seq in decodes), e.max_pages)
    table = np.zeros((slots, width), np.int32)
    for seq in decodes:
      table[seq.slot, :len(seq.pages)] = seq.pages
    by_slot = {seq.slot: seq for seq in decodes}
    sample = e.sampling_arrays([by_slot.get(i) for i in range(slots)])

    def writes(positions, live):
      """(pages, offsets) of the positions; a position past the row's room (or an empty slot) writes scratch."""
      rows = np.arange(slots).reshape((slots,) + (1,) * (positions.ndim - 1))
      page = table[rows, np.minimum(positions // ps, width - 1)]
      return np.where(live, page, 0).astype(np.int32), np.where(live, positions % ps, 0).astype(np.int32)

    def draft_step(tokens, pos, live, counters):
      """One draft decode step over the slots, feeding `tokens` at `pos` (written where `live`)."""
      page, offset = writes(pos, live)
      dec = dict(tokens=tokens, positions=pos, lengths=np.where(active, pos + 1, 0).astype(np.int32),
                 write_page=page, write_offset=offset, table=table)
      self.cache, token, logq = self._propose(self.params, self.cache,
                                              {'dec': dec, 'sample': dict(sample, counters=counters)})
      return token, logq

    tokens, drafts, logqs = last, [], []
    for i in range(k):  # draft step i feeds position base + i and proposes d_{i+1}
      tokens, logq = draft_step(tokens, base + i, active & (i <= room), sample['counters'] + i)
      drafts.append(tokens)
      logqs.append(logq)
    drafts, logq = jnp.stack(drafts, axis=1), jnp.stack(logqs, axis=1)
    pos = base[:, None] + np.arange(k + 1)[None]
    page, offset = writes(pos, active[:, None] & (np.arange(k + 1)[None] <= room[:, None]))
    pre = dict(positions=pos.astype(np.int32), write_page=page, write_offset=offset, table=table,
               lengths=np.where(active, base + k + 1, 0).astype(np.int32))
    e.cache, accepted, out, logprobs = self._verify(e.params, e.cache, {'pre': pre, 'sample': sample},
                                                    last, drafts, logq, room)
    accepted, out, logprobs = np.asarray(accepted), np.asarray(out), np.asarray(logprobs)
    full = active & (accepted == k)
    if full.any():  # the draft never fed d_k; it must hold it before the next round
      draft_step(out[:, k - 1], base + k, full, sample['counters'])
    t = now()
    events = []
    self.stats.rounds += 1
    for seq in decodes:
      i, a = seq.slot, int(accepted[seq.slot])
      self.stats.rows += 1
      self.stats.proposed += int(room[i])
      self.stats.accepted += a
      seq.computed += a + 1
      for j in range(a + 1):
        events += e.append_token(seq, int(out[i, j]), float(logprobs[i, j]), t)
        self.stats.emitted += 1
        if seq.slot is None:  # finished (EOS, a stop string, its cap): the rest is dropped
          break
    return events
