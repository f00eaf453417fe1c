"""The OpenAI-compatible HTTP server: FastAPI routes over an EngineWorker (framework/inference/worker.py).

    app = create_app(worker, codec, cfg, model_name='lm_tiny', chat_template=None)   # launch/serve.py runs it

Routes: POST /v1/completions, POST /v1/chat/completions (with a chat template), GET /v1/models, GET /health,
GET /metrics (Prometheus text). Errors are OpenAI's {"error": {...}}: 400 naming the field (unknown fields
included), 404 for another model, 429 with Retry-After when the queue is full, 503 while shutting down or after
the engine failed, 504 when a request outlives serving.request_timeout_s (a stream gets an error event
instead). A client that disconnects cancels its requests: the engine frees their slots and pages.
"""
from __future__ import annotations

import asyncio
import contextlib
import json

import prometheus_client as prom
from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.exceptions import HTTPException

from framework.inference import openai_api
from framework.inference.openai_api import ApiError, Parsed
from framework.inference.requests import Result
from framework.inference.worker import EngineWorker, QueueFull, Unavailable

DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there
_STATUS = {'timeout': (504, 'timeout'), 'cancelled': (503, 'service_unavailable')}


def create_app(worker: EngineWorker, codec, cfg, model_name: str,
               chat_template: openai_api.ChatTemplate | None = None) -> FastAPI:
  serving, max_tokens = cfg.serving, cfg.inference.max_tokens
  metrics = Metrics(worker)

  @contextlib.asynccontextmanager
  async def lifespan(_):
    yield
    await asyncio.to_thread(worker.drain, serving.shutdown_timeout_s)

  app = FastAPI(title='batchax', lifespan=lifespan)

  @app.exception_handler(ApiError)
  async def api_error(_, e: ApiError):
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

  @app.exception_handler(HTTPException)
  async def http_error(_, e: HTTPException):
    return JSONResponse(openai_api.error_body(str(e.detail), 'invalid_request_error'), status_code=e.status_code,
                        headers=getattr(e, 'headers', None))

  @app.post('/v1/completions')
  async def completions(request: HttpRequest):
    return await generate(request, lambda body: openai_api.parse_completion(body, model_name, max_tokens))

  @app.post('/v1/chat/completions')
  async def chat_completions(request: HttpRequest):
    return await generate(request, lambda body: openai_api.parse_chat(body, model_name, max_tokens,
                                                                        chat_template, codec))

  @app.get('/v1/models')
  async def models():
    return {'object': 'list', 'data': [{'id': model_name, 'object': 'model', 'owned_by': 'batchax',
                                        'max_model_len': cfg.model.max_seq_len}]}

  @app.get('/health')
  async def health():
    if worker.error is not None:
      return JSONResponse({'status': 'failed', 'error': worker.error}, status_code=503)
    if worker.draining or not worker.alive:
      return JSONResponse({'status': 'draining'}, status_code=503)
    return {'status': 'ok', **worker.stats()}

  @app.get('/metrics')
  async def prometheus():
    return Response(prom.generate_latest(metrics.registry), media_type=prom.CONTENT_TYPE_LATEST)

  async def generate(request: HttpRequest, parse):
    try:
      parsed = parse(await _json(request))
      choices = _Choices(asyncio.get_running_loop(), len(parsed.requests), metrics)
      handles = _submit(worker, parsed, choices, serving)
    except ApiError as e:
      metrics.requests.labels('rejected_' + str(e.status)).inc()
      raise
    rid = openai_api.new_id(parsed.chat)
    if parsed.stream:
      return StreamingResponse(_stream(parsed, rid, model_name, choices, handles, worker, codec),
                               media_type='text/event-stream', headers={'Cache-Control': 'no-cache'})
    try:
      results = await _wait(request, choices)
    finally:
      _cancel_open(worker, choices, handles)
    if results is None:
      return Response(status_code=499)  # the client went away; nobody reads this
    failed = next((r for r in results if r.finish_reason not in ('stop', 'length')), None)
    if failed is not None:
      raise _failure(failed, worker)
    return JSONResponse(openai_api.response(parsed, rid, model_name, results, codec))

  return app


class _Choices:
  """One HTTP request's engine events, carried from the worker thread onto the event loop."""

  def __init__(self, loop: asyncio.AbstractEventLoop, n: int, metrics: Metrics):
    self.loop, self.queue, self.metrics = loop, asyncio.Queue(), metrics
    self.results: list[Result | None] = [None] * n
    self.open = n

  def on_event(self, position, event, result) -> None:  # the worker thread
    if result is not None:
      self.metrics.finished(result)  # here, not on the loop: a cancelled request's reader has gone
    with contextlib.suppress(RuntimeError):  # the loop closed (shutdown): nobody is waiting
      self.loop.call_soon_threadsafe(self.queue.put_nowait, (position, event, result))

  def finish(self, position: int, result: Result) -> None:
    self.results[position] = result
    self.open -= 1


async def _json(request: HttpRequest):
  raw = await request.body()
  try:
    return json.loads(raw)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ApiError(400, f'body: not JSON ({e})') from None


def _submit(worker: EngineWorker, parsed: Parsed, choices: _Choices, serving) -> list[int]:
  try:
    return worker.submit(parsed.requests, choices.on_event, serving.request_timeout_s)
  except ValueError as e:
    raise openai_api.bad_request(e) from None
  except QueueFull as e:
    raise ApiError(429, str(e), kind='rate_limit_error', code='queue_full',
                   headers={'Retry-After': str(serving.retry_after_s)}) from None
  except Unavailable as e:
    raise ApiError(503, str(e), kind='service_unavailable') from None


def _cancel_open(worker: EngineWorker, choices: _Choices, handles: list[int]) -> None:
  for position, handle in enumerate(handles):
    if choices.results[position] is None:
      worker.cancel(handle)


def _failure(result: Result, worker: EngineWorker) -> ApiError:
  status, kind = _STATUS.get(result.finish_reason, (500 if worker.error else 400, 'server_error'))
  return ApiError(status, result.error or result.finish_reason, kind=kind, code=result.finish_reason)


async def _wait(request: HttpRequest, choices: _Choices) -> list[Result] | None:
  """Every choice's result, or None if the client disconnected first."""
  while choices.open:
    try:
      position, _, result = await asyncio.wait_for(choices.queue.get(), DISCONNECT_POLL_S)
    except TimeoutError:
      if await request.is_disconnected():
        return None
      continue
    if result is not None:
      choices.finish(position, result)
  return choices.results


async def _stream(parsed: Parsed, rid: str, model: str, choices: _Choices, handles: list[int],
                  worker: EngineWorker, codec):
  """Server-sent events: text deltas per choice, each choice's finish, usage if asked, then [DONE]. A client
  that disconnects stops this generator (CancelledError or GeneratorExit): its requests are cancelled."""
  first = [True] * len(handles)
  try:
    while choices.open:
      position, event, result = await choices.queue.get()
      # A token whose text is held back (a possible stop string, part of a character) shows only with logprobs.
      if event.text or first[position] and parsed.chat or event.token is not None and parsed.logprobs:
        yield openai_api.sse(openai_api.chunk(parsed, rid, model, position, event.text, token=event.token,
                                              logprob=event.logprob, codec=codec, first=first[position]))
        first[position] = False
      if result is None:
        continue
      choices.finish(position, result)
      if result.finish_reason in ('stop', 'length'):
        yield openai_api.sse(openai_api.chunk(parsed, rid, model, position, '', finish=result.finish_reason))
      else:
        yield openai_api.sse(_failure(result, worker).body())
    if parsed.include_usage:
      yield openai_api.sse(openai_api.usage_chunk(parsed, rid, model, choices.results))
    yield openai_api.sse('[DONE]')
  finally:
    _cancel_open(worker, choices, handles)


class Metrics:
  """Prometheus metrics: the engine's state read at scrape time, request outcomes and latencies as observed."""

  def __init__(self, worker: EngineWorker):
    prom.disable_created_metrics()  # the *_created series only double each counter's output here
    self.registry = prom.CollectorRegistry()
    self.registry.register(_EngineCollector(worker))
    r = self.registry
    self.requests = prom.Counter('batchax_requests', 'Generation requests (choices) by outcome: stop, length, '
                                 'timeout, cancelled, error; rejected_<status> for refused HTTP requests',
                                 ['outcome'], registry=r)
    latency = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
    self.ttft = prom.Histogram('batchax_time_to_first_token_seconds', 'Arrival to first token', registry=r,
                               buckets=latency)
    self.tbt = prom.Histogram('batchax_time_between_tokens_seconds', 'Between consecutive tokens of a request',
                              registry=r, buckets=latency)
    self.latency = prom.Histogram('batchax_request_latency_seconds', 'Arrival to last token', registry=r,
                                  buckets=latency)

  def finished(self, result: Result) -> None:
    self.requests.labels(result.finish_reason or 'stop').inc()
    if result.time_to_first_token is not None:
      self.ttft.observe(result.time_to_first_token)
    for t in result.time_between_tokens:
      self.tbt.observe(t)
    if result.latency is not None:
      self.latency.observe(result.latency)


class _EngineCollector:
  def __init__(self, worker: EngineWorker):
    self.worker = worker

  def collect(self):
    s = self.worker.stats()
    for name, key, doc in (('batchax_queue_length', 'waiting', 'Requests waiting for a slot'),
                           ('batchax_running_requests', 'running', 'Requests holding a slot'),
                           ('batchax_kv_pages_used', 'kv_pages_used', 'KV cache pages in use'),
                           ('batchax_kv_pages_total', 'kv_pages_total', 'KV cache pages in the pool'),
                           ('batchax_tokens_per_second', 'tokens_per_s', 'Generated tokens/s, last 10 s')):
      yield GaugeMetricFamily(name, doc, value=s[key])
    yield CounterMetricFamily('batchax_generated_tokens', 'Tokens generated', value=s['tokens_generated'])
    yield CounterMetricFamily('batchax_engine_steps', 'Engine steps run', value=s['steps'])
    yield CounterMetricFamily('batchax_preemptions', 'Requests preempted for KV memory', value=s['preemptions'])
    if 'speculative_rounds' in s:
      yield CounterMetricFamily('batchax_speculative_rounds', 'Target verification passes',
                                value=s['speculative_rounds'])
      yield CounterMetricFamily('batchax_draft_tokens_proposed', 'Draft tokens proposed',
                                value=s['draft_tokens_proposed'])
      yield CounterMetricFamily('batchax_draft_tokens_accepted', 'Draft tokens accepted',
                                value=s['draft_tokens_accepted'])
