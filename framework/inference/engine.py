"""The batched inference engine: continuous batching over a paged KV cache, with a Python API.

    engine = Engine(cfg, params)                   # or loading.engine_from_workdir / engine_from_model_dir
    results = engine.generate([Request(prompt='...', sampling=SamplingParams(max_tokens=32))])
    for event in engine.stream(requests): ...      # per-request tokens as they are sampled

Each `step()` admits waiting requests into free slots, plans the step (framework/inference/scheduler.py), runs
the jitted step (framework/inference/forward.py) once, and turns the sampled tokens into events. A finished
sequence frees its slot and pages at once; a waiting request takes them on the next step. An ARMT model
(armt.segment_len > 0) runs through framework/inference/armt_forward.py instead: the same plan and batch, with
positions within the current segment, and each completed segment written into its slot's memory after the step.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator

import jax
import numpy as np

from framework import mesh as mesh_lib
from framework.inference import config as inference_config
from framework.inference import armt_forward, forward, kv_cache, loading, speculative
from framework.inference.kv_cache import bucket
from framework.inference.loading import model_config
from framework.inference.requests import ByteCodec, Codec, Event, Request, Result, prompt_ids
from framework.inference.sampling import SamplingParams
from framework.inference.scheduler import Scheduler, Sequence, now, offline_order
from framework.mesh import Sharder


def serving_sharder(cfg, devices=None) -> Sharder:
  """The config's mesh with the batch and sequence axes replicated: the weights split as configured (tensor,
  expert, fsdp), every device sees every token of a step."""
  base = mesh_lib.make_sharder(cfg, devices)
  rules = tuple((name, None if name in ('batch', 'seq') else axes) for name, axes in base.rules)
  return Sharder(base.mesh, rules)


class Engine:
  """Serves one model's parameters (already placed on `sharder`'s mesh, or host arrays)."""

  def __init__(self, cfg, params, codec: Codec | None = None, sharder: Sharder | None = None, draft=None):
    """`draft`: (draft config, draft params) to decode speculatively (framework/inference/speculative.py)."""
    self.cfg, self.icfg = cfg, cfg.inference
    self.model_cfg = model_config(cfg)
    self.codec = codec or ByteCodec()
    self.sharder = sharder or serving_sharder(cfg)
    self.vocab_size, self.max_seq_len = cfg.model.vocab_size, cfg.model.max_seq_len
    self.page_size = self.icfg.page_size
    self.max_pages = inference_config.max_pages_per_sequence(cfg)
    num_pages = inference_config.kv_pages(cfg)
    self.pool = kv_cache.PagePool(num_pages, self.page_size)
    self.bytes_per_page = kv_cache.cache_bytes_per_page(self.model_cfg, self.page_size)
    cache_sharding = self.sharder.sharding(kv_cache.cache_names())
    self.param_shardings = jax.tree.map(lambda x: x.sharding, params) if _placed(params, self.sharder) else \
        jax.tree.map(lambda a: a.sharding, loading.abstract_params(cfg, self.sharder))
    self.params = forward.serving_params(self.model_cfg, self.sharder, jax.device_put(params, self.param_shardings))
    self.cache = kv_cache.init_cache(self.model_cfg, num_pages, self.page_size, cache_sharding)
    self.armt = self.model_cfg.armt  # a recurrent-memory model: served segment by segment (armt_forward.py)
    if self.armt is None:
      self._step_fn = forward.make_step(self.model_cfg, self.sharder, self.icfg.attention_impl)
    else:
      if draft is not None:
        raise ValueError('draft: speculative decoding serves the dense and MoE decoders, not the recurrent-memory '
                         'model (armt.segment_len > 0); serve it without a draft')
      step = armt_forward.make_step(self.model_cfg, self.sharder, self.icfg.attention_impl)
      self._step_fn = lambda params, cache, batch: step(params, cache, self.memory, batch)
      self._write_fn = armt_forward.make_write(self.model_cfg, self.sharder, self.icfg.attention_impl)
      self.memory = armt_forward.init_memory(self.model_cfg, self.icfg.slots)
      self.memory_writes = 0
    # The XLA attention takes the decode rows' pages as one ragged list (forward.Attend.ragged); the kernels,
    # which stop at each row's length themselves, take a page table.
    self._ragged = forward.resolve_attention(self.icfg.attention_impl, self.sharder.platform) == 'xla'
    segment = None if self.armt is None else (self.armt.segment_len, self.armt.memory_tokens)
    self.scheduler = Scheduler(self.icfg, self.pool, inference_config.token_budget(cfg), self.max_pages, segment)
    self.steps = 0
    self.tokens_generated = 0
    self.prefix_steps = 0  # decode steps that read a shared prefix once for its group
    self.spec = None if draft is None else speculative.Speculator(self, *draft)
    self._next_index = 0
    self._results: dict[int, Result] = {}

  # --- requests ------------------------------------------------------------------------------------------------

  def default_sampling(self, **overrides) -> SamplingParams:
    return SamplingParams(max_tokens=self.icfg.max_tokens, **overrides)

  def check(self, request: Request) -> tuple[list[int], SamplingParams, int]:
    """(prompt ids, sampling, output cap) of a request this engine can serve; raises ValueError naming the field.
    Reads only the engine's fixed settings, so any thread may call it (the HTTP server does, to answer 400)."""
    params = request.sampling or self.default_sampling()
    ids = prompt_ids(request, self.codec, self.vocab_size, self.max_seq_len)
    params.check(self.vocab_size)
    if self.icfg.max_tokens_limit and params.max_tokens > self.icfg.max_tokens_limit:
      raise ValueError(f'max_tokens: {params.max_tokens} is over this engine\'s limit of '
                       f'{self.icfg.max_tokens_limit} (inference.max_tokens_limit)')
    max_new = min(params.max_tokens, self.max_seq_len - len(ids))
    need = self.scheduler.pages_for(len(ids) + max_new)
    if need > self.pool.capacity:
      raise ValueError(f'max_tokens: the prompt ({len(ids)} tokens) and {max_new} new tokens need {need} KV '
                       f'pages but the pool has {self.pool.capacity}; lower max_tokens or raise '
                       'inference.kv_pages')
    return ids, params, max_new

  def add_request(self, request: Request, arrival: float | None = None) -> tuple[int, list[Event]]:
    """Queues one request; returns its index and, for a bad request, its error event (it never runs)."""
    index = self._next_index
    self._next_index += 1
    rid = str(request.id) if request.id is not None else str(index)
    arrival = now() if arrival is None else arrival
    try:
      ids, params, max_new = self.check(request)
    except ValueError as e:
      result = Result(index=index, id=rid, finish_reason='error', error=str(e))
      self._results[index] = result
      return index, [Event(index=index, id=rid, finished=True, finish_reason='error', error=str(e))]
    seq = Sequence(index=index, id=rid, prompt=ids, params=params, max_new=max_new, arrival=arrival)
    self.scheduler.waiting.append(seq)
    return index, []

  def has_work(self) -> bool:
    return self.scheduler.has_work()

  def result(self, index: int) -> Result | None:
    """A finished request's result, handed over once (the engine keeps no history)."""
    return self._results.pop(index, None)

  def cancel(self, index: int) -> bool:
    """Drops a waiting or running request, freeing its slot and pages; False if it is not in the engine."""
    sched = self.scheduler
    for seq in sched.waiting + sched.running:
      if seq.index == index:
        if seq in sched.waiting:
          sched.waiting.remove(seq)
        sched.release(seq)
        self._results[index] = self._result(seq, 'cancelled')
        return True
    return False

  # --- batch API -------------------------------------------------------------------------------------------------

  def stream(self, requests: Iterable[Request]) -> Iterator[Event]:
    """Runs the requests to completion, yielding each event as it happens (indices count from this call's first
    request)."""
    start = self._next_index
    errors = []
    for request in requests:
      _, events = self.add_request(request)
      errors += events
    if self.icfg.group_offline_batch:
      self.scheduler.waiting = offline_order(self.scheduler.waiting, self.page_size)
    for event in errors:
      yield dataclasses.replace(event, index=event.index - start)
    while self.has_work():
      for event in self.step():
        yield dataclasses.replace(event, index=event.index - start)

  def generate(self, requests: Iterable[Request], on_event=None) -> list[Result]:
    """Runs the requests to completion; results in input order. `on_event(event)` sees each event (progress)."""
    requests = list(requests)
    start = self._next_index
    for event in self.stream(requests):
      if on_event is not None:
        on_event(event)
    return [self._results.pop(start + i) for i in range(len(requests))]

  # --- one step --------------------------------------------------------------------------------------------------

  def step(self) -> list[Event]:
    sched = self.scheduler
    sched.admit()
    decodes, chunks = sched.plan()
    if not decodes and not chunks:
      if sched.waiting and not sched.running:
        raise RuntimeError('no request fits the KV pool; this is a bug (requests are checked on arrival)')
      return []
    if self.spec is not None and not chunks:
      self.steps += 1
      return self.spec.round(decodes)
    groups = sched.prefix_groups(decodes)
    self.prefix_steps += bool(groups)
    batch = self._batch(decodes, chunks, groups)
    self.cache, tokens, logprobs = self._step_fn(self.params, self.cache, batch)
    if self.spec is not None:
      self.spec.mirror(batch)
    tokens, logprobs = np.asarray(tokens), np.asarray(logprobs)
    t = now()
    self.steps += 1
    events = []
    s = self.icfg.slots
    for seq in decodes:
      seq.computed += 1
      events += self.append_token(seq, int(tokens[seq.slot]), float(logprobs[seq.slot]), t)
    for j, (seq, n) in enumerate(chunks):
      seq.computed += n
      sched.register_computed(seq)
      if seq.pending == 0:
        events += self.append_token(seq, int(tokens[s + j]), float(logprobs[s + j]), t)
    if self.armt is not None and self.armt.memory:
      self._write_memory([seq for seq in decodes + [c for c, _ in chunks]
                          if seq.slot is not None and seq.computed % self.armt.segment_len == 0])
    return events

  def _write_memory(self, seqs) -> None:
    """Writes the sequences' just completed segments into their slots' memory (armt_forward.make_write)."""
    if not seqs:
      return
    ps, seg, m = self.page_size, self.armt.segment_len, self.armt.memory_tokens
    k = bucket(len(seqs), self.icfg.slots)
    width = self.scheduler.pages_needed(seg + m)
    pos = np.arange(seg, seg + m)
    pre = dict(positions=np.tile(pos, (k, 1)).astype(np.int32), write_page=np.zeros((k, m), np.int32),
               write_offset=np.zeros((k, m), np.int32), lengths=np.zeros(k, np.int32))
    info = dict(pre_slot=np.full(k, self.icfg.slots, np.int32), pre_first=np.zeros(k, bool))
    rows = []
    for j, seq in enumerate(seqs):
      pre['write_page'][j] = np.asarray(seq.pages)[pos // ps]
      pre['write_offset'][j] = pos % ps
      pre['lengths'][j] = seg + m
      info['pre_slot'][j], info['pre_first'][j] = seq.slot, seq.computed == seg
      rows.append(seq.pages[:width])
    pre['table'] = _table(rows + [[]] * (k - len(seqs)), width)
    self.cache, self.memory = self._write_fn(self.params, self.cache, self.memory, {'pre': pre, 'armt': info})
    self.memory_writes += len(seqs)

  def append_token(self, seq: Sequence, token: int, logprob: float, t: float) -> list[Event]:
    p = seq.params
    if not p.ignore_eos and token in self.codec.eos_ids:
      # What was held back (a possible stop string's start, an unfinished character) goes out with the end.
      text = self._decoded(seq)
      event = self._finish(seq, 'stop', t, text)
      event.text = text[len(seq.emitted_text):] if text.startswith(seq.emitted_text) else ''
      seq.emitted_text += event.text
      return [event]
    seq.tokens.append(token)
    seq.generated.append(token)
    seq.logprobs.append(logprob)
    seq.token_times.append(t)
    self.tokens_generated += 1
    text = self._decoded(seq, token)
    reason = None
    if p.stop:
      cut = min((i for i in (text.find(x) for x in p.stop) if i >= 0), default=-1)
      if cut >= 0:
        text, reason = text[:cut], 'stop'
    if reason is None and (len(seq.generated) >= seq.max_new or len(seq.tokens) >= self.max_seq_len):
      reason = 'length'
    # Hold back what may still become a stop string or an unfinished UTF-8 character.
    hold = max([len(x) - 1 for x in p.stop] + [0])
    visible = text if reason else text[:len(text) - hold].rstrip('\ufffd')
    delta = visible[len(seq.emitted_text):] if visible.startswith(seq.emitted_text) else ''
    seq.emitted_text += delta
    event = Event(index=seq.index, id=seq.id, token=token, text=delta, logprob=logprob if p.logprobs else None)
    if reason is not None:
      self._finish(seq, reason, t, text)
      event.finished, event.finish_reason = True, reason
    return [event]

  def _decoded(self, seq: Sequence, token: int | None = None) -> str:
    """The codec's decode of seq.generated (after `token`, just appended), kept up to date token by token where
    the codec offers a text stream."""
    if seq.text_stream is None:
      if not hasattr(self.codec, 'text_stream'):
        return self.codec.decode(seq.generated)
      seq.text_stream = self.codec.text_stream()
      for t in seq.generated if token is None else seq.generated[:-1]:
        seq.text_stream.push(t)
    if token is not None:
      seq.text_stream.push(token)
    return seq.text_stream.decoded()

  def _finish(self, seq: Sequence, reason: str, t: float, text: str | None = None) -> Event:
    self.scheduler.release(seq)
    self._results[seq.index] = self._result(seq, reason, text)
    return Event(index=seq.index, id=seq.id, finished=True, finish_reason=reason)

  def _result(self, seq: Sequence, reason: str, text: str | None = None) -> Result:
    times = seq.token_times
    return Result(index=seq.index, id=seq.id, text=self.codec.decode(seq.generated) if text is None else text,
                  tokens=list(seq.generated), finish_reason=reason,
                  logprobs=list(seq.logprobs) if seq.params.logprobs else None, prompt_tokens=len(seq.prompt),
                  time_to_first_token=times[0] - seq.arrival if times else None,
                  time_between_tokens=list(np.diff(times)) if len(times) > 1 else [],
                  latency=times[-1] - seq.arrival if times else None, preemptions=seq.preemptions)

  # --- the step's arrays -----------------------------------------------------------------------------------------

  def _batch(self, decodes, chunks, groups) -> dict:
    ps, s = self.page_size, self.icfg.slots
    skip = {id(seq): (g, pages) for g, (members, pages) in enumerate(groups) for seq in members}
    dec = dict(tokens=np.zeros(s, np.int32), positions=np.zeros(s, np.int32), lengths=np.zeros(s, np.int32),
               write_page=np.zeros(s, np.int32), write_offset=np.zeros(s, np.int32))
    rows = [[] for _ in range(s)]
    group_of = np.full(s, -1, np.int32)
    kv_pos = self.scheduler.kv_pos  # a token's place in its pages, and its RoPE position
    for seq in decodes:
      i, pos = seq.slot, kv_pos(seq.computed)
      g, skipped = skip.get(id(seq), (-1, 0))
      dec['tokens'][i], dec['positions'][i] = seq.tokens[seq.computed], pos
      dec['write_page'][i], dec['write_offset'][i] = seq.pages[pos // ps], pos % ps
      dec['lengths'][i] = pos + 1 - skipped * ps
      rows[i] = seq.pages[skipped:self.scheduler.pages_needed(pos + 1)]
      group_of[i] = g
    prefix_rows = [members[0].pages[:pages] for members, pages in groups]
    pre_rows = [seq.pages[:self.scheduler.pages_needed(kv_pos(seq.computed) + n)] for seq, n in chunks]
    # One page-table width for every part of the step (and a fixed group count): fewer shapes to compile.
    width = bucket(max(map(len, (prefix_rows + pre_rows) if self._ragged else (rows + prefix_rows + pre_rows)),
                       default=0), self.max_pages)
    if self._ragged:
      dec.update(_ragged(rows, ps, s * self.max_pages))
    else:
      dec['table'] = _table(rows, width)
    samples = [None] * s
    if chunks:
      # As many prefill rows as the step has chunks, in powers of two: a lone chunk does not pay for a padded row.
      prefill_rows = bucket(len(chunks), self.icfg.prefill_rows)
      samples += [seq for seq, _ in chunks] + [None] * (prefill_rows - len(chunks))
    for seq in decodes:
      samples[seq.slot] = seq
    batch = {'dec': dec, 'sample': self.sampling_arrays(samples)}
    if groups:
      unused = self.icfg.prefix_groups - len(groups)
      lengths = [pages * ps for _, pages in groups] + [0] * unused
      batch['prefix'] = dict(table=_table(prefix_rows + [[]] * unused, width),
                             lengths=np.asarray(lengths, np.int32), groups=group_of)
    if chunks:
      r, c = prefill_rows, self.icfg.prefill_chunk
      pre = dict(tokens=np.zeros((r, c), np.int32), positions=np.zeros((r, c), np.int32),
                 write_page=np.zeros((r, c), np.int32), write_offset=np.zeros((r, c), np.int32),
                 lengths=np.zeros(r, np.int32))
      for j, (seq, n) in enumerate(chunks):
        pos = kv_pos(seq.computed) + np.arange(n)  # a segment model's chunk never crosses a segment end
        pre['tokens'][j, c - n:] = seq.tokens[seq.computed:seq.computed + n]
        pre['positions'][j, c - n:] = pos
        pre['write_page'][j, c - n:] = np.asarray(seq.pages)[pos // ps]
        pre['write_offset'][j, c - n:] = pos % ps
        pre['lengths'][j] = pos[-1] + 1
      pre['table'] = _table(pre_rows + [[]] * (r - len(chunks)), width)
      batch['pre'] = pre
    if self.armt is not None:
      seg = self.armt.segment_len
      info = dict(dec_first=np.zeros(s, bool))
      for seq in decodes:
        info['dec_first'][seq.slot] = seq.computed < seg
      if chunks:
        info['pre_slot'] = np.full(prefill_rows, self.icfg.slots, np.int32)
        info['pre_first'] = np.zeros(prefill_rows, bool)
        for j, (seq, _) in enumerate(chunks):
          info['pre_slot'][j], info['pre_first'][j] = seq.slot, seq.computed < seg
      batch['armt'] = info
    return batch

  def sampling_arrays(self, seqs) -> dict:
    n = len(seqs)
    out = dict(temperature=np.zeros(n, np.float32), top_k=np.zeros(n, np.int32), top_p=np.ones(n, np.float32),
               seeds=np.zeros(n, np.uint32), counters=np.zeros(n, np.int32))
    for i, seq in enumerate(seqs):
      if seq is None:
        continue
      p = seq.params
      out['temperature'][i], out['top_k'][i], out['top_p'][i] = p.temperature, p.top_k, p.top_p
      out['seeds'][i], out['counters'][i] = p.seed, len(seq.generated)
    return out

  # --- reporting ---------------------------------------------------------------------------------------------------

  def kv_stats(self) -> dict:
    return {'kv_pages': self.pool.capacity, 'kv_pages_used': self.pool.used, 'kv_pages_peak': self.pool.peak_used,
            'kv_bytes_per_page': self.bytes_per_page, 'kv_peak_bytes': self.pool.peak_used * self.bytes_per_page,
            'preemptions': self.scheduler.preemptions, 'shared_pages': self.scheduler.shared_pages,
            'prefix_steps': self.prefix_steps, **(self.spec.stats.to_json() if self.spec is not None else {})}


def _table(rows, width: int) -> np.ndarray:
  table = np.zeros((len(rows), width), np.int32)  # unused entries: the scratch page
  for i, row in enumerate(rows):
    table[i, :len(row)] = row
  return table


def _ragged(rows, page_size: int, cap: int) -> dict:
  """The rows' pages back to back for forward.Attend.ragged, padded to a power of two of entries (so a step
  compiles once per bucket) with entries that start past every length."""
  n = bucket(sum(map(len, rows)), cap)
  pages, page_row = np.zeros(n, np.int32), np.zeros(n, np.int32)
  page_start = np.full(n, np.iinfo(np.int32).max // 2, np.int32)
  j = 0
  for i, row in enumerate(rows):
    pages[j:j + len(row)], page_row[j:j + len(row)] = row, i
    page_start[j:j + len(row)] = np.arange(len(row)) * page_size
    j += len(row)
  return dict(pages=pages, page_row=page_row, page_start=page_start)


def _placed(params, sharder: Sharder) -> bool:
  leaves = jax.tree.leaves(params)
  return bool(leaves) and all(isinstance(x, jax.Array) and isinstance(x.sharding, jax.sharding.NamedSharding)
                              and x.sharding.mesh == sharder.mesh for x in leaves)
