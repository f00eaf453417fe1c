"""The engine worker thread (framework/inference/worker.py): results equal to the engine's own, cancel and timeout
free slots and pages, a full queue refuses, a failed engine fails every request, drain finishes or cancels."""
import threading
import time

import jax
import pytest

from framework.inference.engine import Engine, serving_sharder
from framework.inference.requests import Request
from framework.inference.sampling import SamplingParams
from framework.inference.worker import EngineWorker, QueueFull, Unavailable
from framework.mesh import make_sharder
from framework.train import Trainer
from serving_setup import small_cfg

_PARAMS = {}


def params():
  if not _PARAMS:
    cfg = small_cfg()
    _PARAMS['p'] = jax.device_get(Trainer(cfg, make_sharder(cfg, jax.devices()[:1])).init(jax.random.key(1)).params)
  return _PARAMS['p']


def new_engine():
  cfg = small_cfg()
  return Engine(cfg, params(), sharder=serving_sharder(cfg, jax.devices()[:1]))


class Collector:
  """on_event for submit(): every event by position, and each position's result."""

  def __init__(self, n):
    self.events = [[] for _ in range(n)]
    self.results = [None] * n
    self.done = threading.Event()
    self.first_token = threading.Event()

  def __call__(self, position, event, result):
    self.events[position].append(event)
    if event.token is not None:
      self.first_token.set()
    if result is not None:
      self.results[position] = result
      if all(r is not None for r in self.results):
        self.done.set()

  def wait(self, timeout=120):
    assert self.done.wait(timeout), 'the worker did not finish the requests'
    return self.results


def req(prompt, max_tokens=6, **kw):
  return Request(prompt=prompt, sampling=SamplingParams(max_tokens=max_tokens, **kw))


@pytest.fixture
def worker():
  w = EngineWorker(new_engine(), max_queue=2)
  w.start()
  yield w
  w.drain(timeout_s=0)


def test_results_equal_the_engines_own(worker):
  prompts = ['hello there', 'the cat sat', 'a']
  want = new_engine().generate([req(p) for p in prompts])
  collectors = [Collector(1) for _ in prompts]
  for p, c in zip(prompts, collectors):  # separate submits: they share the engine's steps
    worker.submit([req(p)], c, timeout_s=120)
  got = [c.wait()[0] for c in collectors]
  assert [g.tokens for g in got] == [w.tokens for w in want]
  assert [g.text for g in got] == [w.text for w in want]
  assert all(''.join(e.text for e in c.events[0]) == g.text for c, g in zip(collectors, got))


def test_cancel_and_timeout_free_the_slot_and_pages(worker):
  c = Collector(1)
  (handle,) = worker.submit([req('hello', max_tokens=50, ignore_eos=True)], c, timeout_s=120)
  assert c.first_token.wait(60)
  worker.cancel(handle)
  (result,) = c.wait()
  assert result.finish_reason == 'cancelled' and 0 < len(c.events[0]) < 50
  late = Collector(1)
  worker.submit([req('hello', max_tokens=50, ignore_eos=True)], late, timeout_s=0.0)
  assert late.wait()[0].finish_reason == 'timeout' and 'request_timeout_s' in late.results[0].error
  deadline = time.monotonic() + 10
  while (worker.outstanding() or worker.stats()['running']) and time.monotonic() < deadline:
    time.sleep(0.02)
  assert worker.outstanding() == 0 and worker.stats()['running'] == 0
  assert worker.engine.pool.used == 0  # read after the worker went idle: nothing holds a page


def test_a_full_queue_refuses_and_bad_requests_raise_before_queueing(worker):
  assert worker.capacity == 4 + 2  # inference.slots + max_queue
  with pytest.raises(ValueError, match='^n: 7 choices'):
    worker.submit([req('x')] * 7, Collector(7), timeout_s=60)
  with pytest.raises(ValueError, match='^temperature:'):
    worker.submit([req('x'), req('y', temperature=-1.0)], Collector(2), timeout_s=60)
  assert worker.outstanding() == 0
  long = Collector(6)
  handles = worker.submit([req('x', max_tokens=40, ignore_eos=True)] * 6, long, timeout_s=120)
  with pytest.raises(QueueFull, match='6 requests are running or waiting'):
    worker.submit([req('y')], Collector(1), timeout_s=60)
  for h in handles:
    worker.cancel(h)
  assert all(r.finish_reason == 'cancelled' for r in long.wait())
  ok = Collector(1)
  worker.submit([req('y')], ok, timeout_s=60)  # room again
  assert ok.wait()[0].finish_reason in ('stop', 'length')


def test_a_failed_engine_fails_every_request_and_refuses_new_ones():
  w = EngineWorker(new_engine(), max_queue=4)

  def broken():
    raise RuntimeError('device lost')

  w.engine.step = broken
  w.start()
  c = Collector(2)
  w.submit([req('a'), req('b')], c, timeout_s=60)
  results = c.wait()
  assert [r.finish_reason for r in results] == ['error', 'error']
  assert 'RuntimeError: device lost' in results[0].error and not w.alive
  with pytest.raises(Unavailable, match='the engine failed: RuntimeError: device lost'):
    w.submit([req('a')], Collector(1), timeout_s=60)
  w.drain(timeout_s=0)


def test_drain_finishes_in_flight_requests_then_refuses():
  w = EngineWorker(new_engine(), max_queue=2)
  w.start()
  short, long = Collector(1), Collector(1)
  w.submit([req('hello', max_tokens=8, ignore_eos=True)], short, timeout_s=60)
  w.submit([req('there', max_tokens=50, ignore_eos=True)], long, timeout_s=60)
  assert long.first_token.wait(60)
  t = threading.Thread(target=w.drain, kwargs={'timeout_s': 60})
  t.start()
  time.sleep(0.05)
  with pytest.raises(Unavailable, match='shutting down'):
    w.submit([req('late')], Collector(1), timeout_s=60)
  t.join(120)
  assert short.results[0].finish_reason == 'length' and len(short.results[0].tokens) == 8
  assert long.results[0].finish_reason == 'length' and len(long.results[0].tokens) == 50
  w2 = EngineWorker(new_engine(), max_queue=2)
  w2.start()
  cut = Collector(1)
  w2.submit([req('there', max_tokens=60, ignore_eos=True)], cut, timeout_s=60)
  assert cut.first_token.wait(60)
  w2.drain(timeout_s=0)  # no time to finish: cancelled, never lost
  assert cut.results[0].finish_reason == 'cancelled'
