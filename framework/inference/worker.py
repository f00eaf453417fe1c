"""The engine on its own thread, fed through a queue: what the HTTP server (framework/inference/server.py) drives.

    worker = EngineWorker(engine, max_queue=256)
    worker.start()
    handles = worker.submit([request], on_event, timeout_s=60)   # ValueError (400), QueueFull (429), Unavailable (503)
    worker.cancel(handles[0])                                    # a client went away: its slot and pages are freed
    worker.drain(timeout_s=30)                                   # stop admitting, finish or cancel, stop the thread

Only the worker thread touches the engine after start(); other threads talk to it through the inbox. A request is
checked in the caller's thread (Engine.check reads only fixed settings), so a bad one is refused at once, and a
full queue is refused before anything is queued. `on_event(position, event, result)` runs on the worker thread
for each event of the request at `position` in its submit() call; `result` is set on the last one.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import queue
import threading
import time
from collections.abc import Callable

from absl import logging

from framework.inference.requests import Event, Request, Result

IDLE_WAIT_S = 0.05      # how long an idle worker blocks on its inbox before checking deadlines again
RATE_WINDOW_S = 10.0    # tokens/s is measured over this trailing window

OnEvent = Callable[[int, Event, 'Result | None'], None]


class QueueFull(Exception):
  """Every slot is busy and the queue holds max_queue requests: answer 429."""


class Unavailable(Exception):
  """The worker is draining for shutdown, or its engine failed: answer 503."""


@dataclasses.dataclass
class _Pending:
  position: int
  on_event: OnEvent
  deadline: float
  index: int | None = None  # the engine's index, once the worker thread has added it


class EngineWorker:

  def __init__(self, engine, max_queue: int):
    self.engine = engine
    self.capacity = engine.icfg.slots + max_queue  # requests in the engine at once, running or waiting
    self._inbox: queue.SimpleQueue = queue.SimpleQueue()
    self._lock = threading.Lock()
    self._outstanding = 0
    self._handles = itertools.count()
    self._pending: dict[int, _Pending] = {}        # worker thread only
    self._by_index: dict[int, int] = {}            # engine index -> handle; worker thread only
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name='engine-worker', daemon=True)
    self._rate: collections.deque = collections.deque()  # (time, tokens) per step, the last RATE_WINDOW_S
    self._rate_tokens = 0                                # their sum
    self.draining = False
    self.error: str | None = None                  # why the engine stopped, if it failed
    self._stats = self._snapshot()

  # --- any thread ------------------------------------------------------------------------------------------------

  def start(self) -> None:
    self._thread.start()

  @property
  def alive(self) -> bool:
    return self._thread.is_alive() and self.error is None

  def submit(self, requests: list[Request], on_event: OnEvent, timeout_s: float) -> list[int]:
    """Queues the requests (all or none); returns their handles. Raises ValueError naming the bad field of the
    first bad request, QueueFull, or Unavailable."""
    if len(requests) > self.capacity:
      raise ValueError(f'n: {len(requests)} choices are more than this server holds at once ({self.capacity}: '
                       'inference.slots + serving.max_queue); ask for fewer')
    for request in requests:
      self.engine.check(request)
    with self._lock:
      if self.error is not None:
        raise Unavailable(f'the engine failed: {self.error}')
      if self.draining or self._stop.is_set():
        raise Unavailable('the server is shutting down')
      if self._outstanding + len(requests) > self.capacity:
        raise QueueFull(f'{self._outstanding} requests are running or waiting (the most is {self.capacity}: '
                        'inference.slots + serving.max_queue); retry later')
      self._outstanding += len(requests)
      handles = [next(self._handles) for _ in requests]
    deadline = time.monotonic() + timeout_s
    for position, (handle, request) in enumerate(zip(handles, requests)):
      self._inbox.put(('submit', handle, request, _Pending(position, on_event, deadline)))
    return handles

  def cancel(self, handle: int) -> None:
    """Drops the request if it is still in the engine; its last event has finish_reason 'cancelled'."""
    self._inbox.put(('cancel', handle, None, None))

  def stats(self) -> dict:
    """The latest snapshot (taken after each step): queue length, running requests, KV pages, tokens/s."""
    return self._stats

  def drain(self, timeout_s: float) -> None:
    """Stops admitting; waits up to timeout_s for in-flight requests to finish, cancels the rest, stops."""
    self.draining = True
    end = time.monotonic() + timeout_s
    while self.outstanding() and self.alive and time.monotonic() < end:
      time.sleep(IDLE_WAIT_S)
    if self.outstanding():
      logging.warning('shutdown: cancelling %d requests still running after %.0f s', self.outstanding(), timeout_s)
    self._inbox.put(('stop', None, None, None))
    self._thread.join(timeout=max(10.0, timeout_s))

  def outstanding(self) -> int:
    with self._lock:
      return self._outstanding

  # --- the worker thread -----------------------------------------------------------------------------------------

  def _run(self) -> None:
    try:
      while not self._stop.is_set():
        self._read_inbox(block=not self.engine.has_work())
        self._expire(time.monotonic())
        if not self._stop.is_set() and self.engine.has_work():
          events = self.engine.step()
          self._count(sum(e.token is not None for e in events))
          for event in events:
            self._dispatch(event)
        self._stats = self._snapshot()
    except Exception as e:  # pylint: disable=broad-except  (a failed engine must fail its requests, not hang them)
      logging.exception('the engine failed')
      self.error = f'{type(e).__name__}: {e}'
      for handle in list(self._pending):
        self._end(handle, 'error', self.error)
    finally:
      for handle in list(self._pending):
        self._end(handle, 'cancelled', 'the server shut down before the request finished')
      self._stats = self._snapshot()

  def _read_inbox(self, block: bool) -> None:
    try:
      item = self._inbox.get(timeout=IDLE_WAIT_S) if block else self._inbox.get_nowait()
    except queue.Empty:
      return
    while True:
      kind, handle, request, pending = item
      if kind == 'submit':
        self._add(handle, request, pending)
      elif kind == 'cancel':
        self._cancel(handle, 'cancelled', 'the client cancelled the request')
      else:
        self._stop.set()
      try:
        item = self._inbox.get_nowait()
      except queue.Empty:
        return

  def _add(self, handle: int, request: Request, pending: _Pending) -> None:
    self._pending[handle] = pending
    index, errors = self.engine.add_request(dataclasses.replace(request, id=str(handle)))
    pending.index = index
    self._by_index[index] = handle
    for event in errors:
      self._dispatch(event)

  def _cancel(self, handle: int, reason: str, why: str) -> None:
    pending = self._pending.get(handle)
    if pending is None:
      return  # finished already
    if pending.index is not None and self.engine.cancel(pending.index):
      self.engine.result(pending.index)  # the engine's 'cancelled' result: replaced by ours, with the reason
    self._end(handle, reason, why)

  def _expire(self, t: float) -> None:
    for handle in [h for h, p in self._pending.items() if p.deadline <= t]:
      self._cancel(handle, 'timeout', 'the request ran past serving.request_timeout_s')

  def _dispatch(self, event: Event) -> None:
    handle = self._by_index.get(event.index)
    if handle is None:
      return
    pending = self._pending[handle]
    result = None
    if event.finished:
      result = self.engine.result(event.index)
      self._forget(handle)
    pending.on_event(pending.position, event, result)

  def _end(self, handle: int, reason: str, why: str) -> None:
    pending = self._pending[handle]
    self._forget(handle)
    rid = str(handle)
    result = Result(index=-1, id=rid, finish_reason=reason, error=why)
    pending.on_event(pending.position, Event(index=-1, id=rid, finished=True, finish_reason=reason, error=why),
                     result)

  def _forget(self, handle: int) -> None:
    pending = self._pending.pop(handle)
    self._by_index.pop(pending.index, None)
    with self._lock:
      self._outstanding -= 1

  def _count(self, tokens: int) -> None:
    self._rate.append((time.monotonic(), tokens))
    self._rate_tokens += tokens

  def _snapshot(self) -> dict:
    sched, pool = self.engine.scheduler, self.engine.pool
    t = time.monotonic()
    while self._rate and self._rate[0][0] < t - RATE_WINDOW_S:
      self._rate_tokens -= self._rate.popleft()[1]
    span = t - self._rate[0][0] if self._rate else 0.0
    running = len(sched.running)
    return {'waiting': max(0, self.outstanding() - running), 'running': running, 'kv_pages_used': pool.used,
            'kv_pages_total': pool.capacity, 'tokens_per_s': self._rate_tokens / span if span > 0 else 0.0,
            'steps': self.engine.steps, 'tokens_generated': self.engine.tokens_generated,
            'preemptions': sched.preemptions,
            **(self.engine.spec.stats.to_json() if self.engine.spec is not None else {})}
