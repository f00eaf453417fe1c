"""Host-side sequence state and the per-step plan: which sequences decode, which prompts advance by how much,
who is admitted and who is preempted, and which decodes share a prefix.

Every step (Sarathi-Serve): every running decode first (one token each), then the next chunks of partly
prefilled prompts, then the first chunks of newly admitted ones, within the token budget. Admission never
overcommits the KV pool: a request is admitted only when the pages for its whole prompt are free (its shared
prefix pages are taken, not allocated); a decode that needs a page when none is free preempts the most recently
admitted sequence, whose pages go back and which is later recomputed from its prompt and the tokens it had.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

from framework.inference import kv_cache
from framework.inference.kv_cache import PagePool
from framework.inference.sampling import SamplingParams


@dataclasses.dataclass(eq=False)
class Sequence:
  index: int
  id: str
  prompt: list[int]
  params: SamplingParams
  max_new: int
  arrival: float
  tokens: list[int] = dataclasses.field(default_factory=list)      # prompt + generated
  generated: list[int] = dataclasses.field(default_factory=list)
  logprobs: list[float] = dataclasses.field(default_factory=list)
  token_times: list[float] = dataclasses.field(default_factory=list)
  computed: int = 0            # tokens whose K and V are in the pages
  pages: list[int] = dataclasses.field(default_factory=list)
  keys: list[bytes] = dataclasses.field(default_factory=list)    # keys of the prompt's shareable full pages
  slot: int | None = None
  admitted: int = -1           # admission counter (preemption takes the largest)
  preemptions: int = 0
  emitted_text: str = ''
  text_stream: Any = None      # the codec's decode of `generated`, kept up to date (Engine._decoded)

  def __post_init__(self):
    self.tokens = list(self.prompt)

  @property
  def pending(self) -> int:
    """Tokens still to run through the model before the next sample."""
    return len(self.tokens) - self.computed


class Scheduler:
  """Waiting and running sequences over `slots` slots and one page pool.

  `segment`: (segment_len, memory_tokens) of a recurrent-memory model (framework/inference/armt_forward.py): a
  sequence's pages then hold its current segment only (and the segment's memory rows), chunks stop at segment
  ends, and prompt pages are not shared (a segment's K and V depend on the whole sequence before it)."""

  def __init__(self, icfg, pool: PagePool, budget: int, max_pages: int, segment: tuple[int, int] | None = None):
    self.icfg, self.pool, self.budget, self.max_pages = icfg, pool, budget, max_pages
    self.segment = segment
    self.sharing = icfg.prefix_sharing and segment is None
    self.waiting: list[Sequence] = []
    self.slots: list[Sequence | None] = [None] * icfg.slots
    self._admissions = 0
    self.preemptions = 0
    self.shared_pages = 0  # pages admissions took from the prefix registry instead of computing them
    self._in_flight: dict[bytes, Sequence] = {}  # prefix page keys being computed, and by whom
    self.reserve = max(1, math.ceil(0.01 * pool.capacity))  # pages kept back at admission for decodes to grow

  @property
  def running(self) -> list[Sequence]:
    return [s for s in self.slots if s is not None]

  def has_work(self) -> bool:
    return bool(self.waiting) or any(s is not None for s in self.slots)

  def pages_needed(self, length: int) -> int:
    return -(-length // self.pool.page_size)

  def pages_for(self, length: int) -> int:
    """Pages a sequence of `length` tokens holds (with a segment model: its segment, and the memory rows once
    a segment can complete)."""
    if self.segment is None:
      return self.pages_needed(length)
    seg, memory = self.segment
    return self.pages_needed(min(length, seg) + (memory if length >= seg else 0))

  def kv_pos(self, pos: int) -> int:
    """Where token `pos` of a sequence sits in its pages (and its RoPE position)."""
    return pos if self.segment is None else pos % self.segment[0]

  # --- admission -----------------------------------------------------------------------------------------------

  def admit(self) -> None:
    if self.icfg.scheduling == 'static' and self.running:
      return
    deferred = []
    while self.waiting and None in self.slots:
      seq = self.waiting.pop(0)
      status = self._try_admit(seq)
      if status == 'full':
        self.waiting.insert(0, seq)
        break
      if status == 'defer':
        deferred.append(seq)
    self.waiting[:0] = deferred

  def _try_admit(self, seq: Sequence) -> str:
    ps = self.pool.page_size
    shared = []
    if self.sharing:
      # Full pages of the prompt, but never the page holding its last token: that token must run to be sampled.
      count = min(len(seq.prompt), len(seq.tokens) - 1) // ps
      if len(seq.keys) != count:
        seq.keys = kv_cache.page_keys(seq.prompt, ps, count)
      for key in seq.keys:
        page = self.pool.lookup(key)
        if page is None:
          if key in self._in_flight:
            return 'defer'  # another sequence is computing this page now: wait for it rather than compute it twice
          break
        shared.append(page)
    need = self.pages_for(len(seq.tokens)) - len(shared)
    running = bool(self.running)
    if need + (self.reserve if running else 0) > self.pool.free:
      return 'full'
    pages = self.pool.allocate(need)
    for page in shared:
      self.pool.share(page)
    self.shared_pages += len(shared)
    seq.pages, seq.computed = shared + pages, len(shared) * ps
    for key in seq.keys[len(shared):]:
      self._in_flight.setdefault(key, seq)
    seq.slot = self.slots.index(None)
    self.slots[seq.slot] = seq
    seq.admitted, self._admissions = self._admissions, self._admissions + 1
    return 'ok'

  # --- the step's plan -----------------------------------------------------------------------------------------

  def plan(self) -> tuple[list[Sequence], list[tuple[Sequence, int]]]:
    """(decoding sequences, [(prefilling sequence, chunk tokens)]), after growing or preempting pages."""
    decodes = self._grow([s for s in self.running if s.pending == 1])
    left = self.budget - len(decodes)
    chunks = []
    for seq in sorted((s for s in self.running if s.pending > 1), key=lambda s: s.admitted):
      if len(chunks) == self.icfg.prefill_rows or left <= 0:
        break
      n = min(seq.pending, self.icfg.prefill_chunk, left)
      if self.segment is not None:  # the memory is written between segments
        n = min(n, self.segment[0] - seq.computed % self.segment[0])
      chunks.append((seq, n))
      left -= n
    return decodes, chunks

  def _grow(self, decodes: list[Sequence]) -> list[Sequence]:
    """Gives each decode the page its next token goes into, preempting the newest sequences when none is free."""
    ready = []
    for seq in sorted(decodes, key=lambda s: s.admitted):
      if seq.slot is None:  # preempted below, by an older one
        continue
      while self.pages_for(seq.computed + 1) > len(seq.pages):
        page = self.pool.allocate(1)
        if page is not None:
          seq.pages += page
          continue
        victim = max(self.running, key=lambda s: s.admitted)
        self.preempt(victim)
        if victim is seq:
          break
      if seq.slot is not None:
        ready.append(seq)
    return [s for s in ready if s.slot is not None]

  def preempt(self, seq: Sequence) -> None:
    self.release(seq)
    seq.computed, seq.preemptions = 0, seq.preemptions + 1
    self.preemptions += 1
    self.waiting.insert(0, seq)

  def release(self, seq: Sequence) -> None:
    """Frees the sequence's slot and pages (finished, failed or preempted)."""
    self.pool.release(seq.pages)
    seq.pages = []
    for key in [k for k, owner in self._in_flight.items() if owner is seq]:
      del self._in_flight[key]
    if seq.slot is not None:
      self.slots[seq.slot] = None
      seq.slot = None

  def register_computed(self, seq: Sequence) -> None:
    """Offers the prompt pages `seq` has finished computing for sharing."""
    if not self.sharing:
      return
    done = min(seq.computed // self.pool.page_size, len(seq.keys))
    for j in range(done):
      key = seq.keys[j]
      self.pool.register(seq.pages[j], key)
      if self._in_flight.get(key) is seq:
        del self._in_flight[key]

  # --- shared prefixes of the decodes (Hydragen) ---------------------------------------------------------------

  def prefix_groups(self, decodes: list[Sequence]) -> list[tuple[list[Sequence], int]]:
    """Up to inference.prefix_groups groups of decodes sharing their first pages: (members, shared pages).

    Groups are chosen by the prefix reads they save, (members - 1) x shared pages."""
    if not (self.sharing and self.icfg.prefix_groups):
      return []
    by_first: dict[int, list[Sequence]] = {}
    for seq in decodes:
      if seq.pages and self.pool.refcount(seq.pages[0]) > 1:
        by_first.setdefault(seq.pages[0], []).append(seq)
    groups = []
    for members in by_first.values():
      if len(members) < 2:
        continue
      common = 0
      # Only pages every member holds and no member writes: full pages before each one's current token.
      limit = min(s.computed // self.pool.page_size for s in members)
      while common < limit and len({s.pages[common] for s in members}) == 1:
        common += 1
      if common:
        groups.append((members, common))
    groups.sort(key=lambda g: -(len(g[0]) - 1) * g[1])
    return groups[:self.icfg.prefix_groups]


def offline_order(seqs: list[Sequence], page_size: int) -> list[Sequence]:
  """BatchLLM's grouping of an offline batch: prompts sharing their first page next to each other (in prefix-tree
  order, so longer common prefixes sit closer), groups with the longest outputs first, and inside a group the
  longest outputs first (decode-heavy work starts early and overlaps the rest)."""
  groups: dict[tuple, list[Sequence]] = {}
  for seq in sorted(seqs, key=lambda s: s.prompt):
    head = tuple(seq.prompt[:page_size]) if len(seq.prompt) > page_size else ('own', seq.index)
    groups.setdefault(head, []).append(seq)
  ordered = sorted(groups.values(), key=lambda g: -max(s.max_new for s in g))
  out = []
  for g in ordered:
    # Stable sort keeps prefix-tree order among equal output caps.
    out += sorted(g, key=lambda s: -s.max_new)
  return out


def now() -> float:
  return time.perf_counter()
