"""`launch.bench --suite=serving`: a load test of the HTTP server over real sockets.

Exports a randomly initialised model as a Llama-format directory, starts `python -m launch.serve` on it in a
subprocess (a free loopback port), and sends N requests at once from an async client: random prompt lengths
(a third start with one of four shared system prompts), heavy-tailed output lengths (ignore_eos, so each runs to
its cap), half streamed, after an untimed warm-up of the 64 longest (so compiles are not timed). Every response is checked: status 200, well-formed JSON or server-sent events ending in
[DONE], the completion length asked for, a response id seen once, each request answered once. Prints and writes
latency p50/p99, time to first token (streamed requests, measured by the client), tokens/s, and the server's
own /metrics. Writes OUT/requests.csv, OUT/summary.md / .json, OUT/latency.png and OUT/command.txt.
"""
from __future__ import annotations

import asyncio
import csv
import json
import os
import queue
import random
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from launch import study_io

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = dict(d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=384, max_seq_len=512)
SERVE = dict(slots=32, page_size=16, prefill_rows=4, prefill_chunk=64)
SYSTEM_PROMPTS = tuple(f'System {i}: you are a terse assistant; answer in one line. ' * 2 for i in range(4))
WORDS = ('the', 'cat', 'sat', 'on', 'a', 'mat', 'and', 'then', 'it', 'ran', 'far', 'away', 'batch', 'token')


WARMUP_REQUESTS = 64


class LoadError(RuntimeError):
  """A response was lost, duplicated or malformed."""


def _export_model(directory: str) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  import configs.lm_tiny as lm_tiny  # pylint: disable=g-import-not-at-top
  from framework import config as config_lib  # pylint: disable=g-import-not-at-top
  from framework.inference import hf_format  # pylint: disable=g-import-not-at-top
  from framework.inference.requests import ByteCodec  # pylint: disable=g-import-not-at-top
  from framework.mesh import make_sharder  # pylint: disable=g-import-not-at-top
  from framework.train import Trainer  # pylint: disable=g-import-not-at-top
  cfg = lm_tiny.get_config()
  cfg.model.update(**MODEL)
  cfg.data.seq_len = MODEL['max_seq_len']
  cfg.mesh.update(data=1, fsdp=1, tensor=1)
  config_lib.validate(cfg, num_devices=1, backend=jax.default_backend())
  params = Trainer(cfg, make_sharder(cfg, jax.devices()[:1])).init(jax.random.key(0)).params
  hf_format.export(cfg, params, directory, codec=ByteCodec())


def workload(n: int, seed: int) -> list[dict]:
  """n request bodies (with the client-side fields `_stream`, `_max`)."""
  rng = random.Random(seed)
  out = []
  for i in range(n):
    words = ' '.join(rng.choice(WORDS) for _ in range(min(40, int(rng.paretovariate(1.2) * 3))))
    prompt = (SYSTEM_PROMPTS[i % 4] if i % 3 == 0 else '') + f'{i}: {words}'
    max_tokens = min(160, max(1, int(rng.paretovariate(1.1) * 6)))
    out.append({'model': 'bench', 'prompt': prompt, 'max_tokens': max_tokens, 'temperature': 0.7, 'seed': i,
                'ignore_eos': True, 'stream': i % 2 == 1, '_index': i})
  return out


class _ServerProcess:

  def __init__(self, model_dir: str, max_queue: int):
    args = [sys.executable, '-m', 'launch.serve', f'--model_dir={model_dir}', '--config=configs/lm_tiny.py',
            f'--config.model.max_seq_len={MODEL["max_seq_len"]}', '--config.mesh.data=1', '--config.mesh.fsdp=1',
            '--config.mesh.tensor=1', '--port=0', f'--config.serving.max_queue={max_queue}',
            '--config.serving.model_name=bench'] + [f'--config.inference.{k}={v}' for k, v in SERVE.items()]
    env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
    self.proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in self.proc.stdout], daemon=True).start()
    deadline = time.monotonic() + 300
    self.url = None
    while self.url is None:
      try:
        line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
      except queue.Empty:
        self.proc.kill()
        raise RuntimeError(f'the server did not start: {self.proc.stderr.read()[-2000:]}') from None
      if line.startswith('serving bench on '):
        self.url = line.split()[-1]

  def stop(self) -> int:
    self.proc.terminate()
    try:
      return self.proc.wait(timeout=120)
    finally:
      if self.proc.poll() is None:
        self.proc.kill()


async def _one(client, body: dict) -> dict:
  """Sends one request; returns its row (raises LoadError for a malformed answer)."""
  payload = {k: v for k, v in body.items() if not k.startswith('_')}
  start = time.perf_counter()
  row = {'index': body['_index'], 'stream': body['stream'], 'max_tokens': body['max_tokens']}
  if not body['stream']:
    r = await client.post('/v1/completions', json=payload)
    if r.status_code != 200:
      raise LoadError(f'request {row["index"]}: status {r.status_code}: {r.text[:200]}')
    data = r.json()
    (choice,) = data['choices']
    if not isinstance(choice['text'], str) or choice['finish_reason'] not in ('stop', 'length'):
      raise LoadError(f'request {row["index"]}: malformed choice {choice}')
    row.update(id=data['id'], tokens=data['usage']['completion_tokens'], ttft_s=None)
  else:
    first, tokens, ids, finish, done = None, 0, set(), None, False
    async with client.stream('POST', '/v1/completions', json={**payload, 'logprobs': 0}) as r:
      if r.status_code != 200:
        raise LoadError(f'request {row["index"]}: status {r.status_code}')
      async for line in r.aiter_lines():
        if not line:
          continue
        if not line.startswith('data: ') or done:
          raise LoadError(f'request {row["index"]}: a line after [DONE] or not an event: {line[:100]!r}')
        data = line[len('data: '):]
        if data == '[DONE]':
          done = True
          continue
        event = json.loads(data)
        if 'error' in event:
          raise LoadError(f'request {row["index"]}: {event["error"]}')
        ids.add(event['id'])
        (choice,) = event['choices']
        if choice['logprobs'] is not None:  # one chunk per token when logprobs are asked for
          tokens += len(choice['logprobs']['tokens'])
          first = first or time.perf_counter()
        if choice['finish_reason'] is not None:
          if finish is not None:
            raise LoadError(f'request {row["index"]}: two finish reasons')
          finish = choice['finish_reason']
    if not done or finish is None or len(ids) != 1:
      raise LoadError(f'request {row["index"]}: stream ended without [DONE] / a finish reason / one id')
    row.update(id=ids.pop(), tokens=tokens, ttft_s=first - start if first else None)
  row['latency_s'] = time.perf_counter() - start
  return row


async def _load(url: str, bodies: list[dict]) -> tuple[list[dict], float, str]:
  import logging  # pylint: disable=g-import-not-at-top
  import httpx  # pylint: disable=g-import-not-at-top  (the `serve` extra)
  logging.getLogger('httpx').setLevel(logging.WARNING)  # a line per request otherwise
  limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))
  async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(900.0), limits=limits) as client:
    # Warm-up, untimed: the longest requests take the engine's step through every page-table width it compiles.
    longest = sorted(bodies, key=lambda b: b['max_tokens'] + len(b['prompt']), reverse=True)[:WARMUP_REQUESTS]
    await asyncio.gather(*(_one(client, b) for b in longest))
    start = time.perf_counter()
    rows = await asyncio.gather(*(_one(client, b) for b in bodies))
    wall = time.perf_counter() - start
    metrics = (await client.get('/metrics')).text
  return list(rows), wall, metrics


def check(rows: list[dict], bodies: list[dict]) -> None:
  if sorted(r['index'] for r in rows) != list(range(len(bodies))):
    raise LoadError('a request was lost or answered twice')
  if len({r['id'] for r in rows}) != len(rows):
    raise LoadError('two responses share an id')
  for r in rows:
    want = bodies[r['index']]['max_tokens']  # prompts are short enough that no cap meets the context
    if r['tokens'] != want:
      raise LoadError(f'request {r["index"]}: {r["tokens"]} tokens, asked for {want}')


def _metric(text: str, name: str) -> float | None:
  for line in text.splitlines():
    if line.startswith(name + ' '):
      return float(line.split()[-1])
  return None


def run(requests: int, out: str, command: str) -> dict:
  if requests < 1:
    raise ValueError(f'--requests: {requests} must be >= 1')
  bodies = workload(requests, seed=0)
  with tempfile.TemporaryDirectory() as tmp:
    model_dir = os.path.join(tmp, 'model')
    _export_model(model_dir)
    server = _ServerProcess(model_dir, max_queue=requests)
    try:
      rows, wall, metrics = asyncio.run(_load(server.url, bodies))
    finally:
      code = server.stop()
  check(rows, bodies)
  if code != 0:
    raise LoadError(f'the server exited {code} on SIGTERM')
  pct = lambda xs, q: float(np.percentile(xs, q))
  latency = [r['latency_s'] for r in rows]
  ttft = [r['ttft_s'] for r in rows if r['ttft_s'] is not None]
  tokens = sum(r['tokens'] for r in rows)
  summary = {'requests': requests, 'streamed': sum(r['stream'] for r in rows), 'completion_tokens': tokens,
             'wall_s': wall, 'tokens_per_s': tokens / wall, 'requests_per_s': requests / wall,
             'latency_p50_s': pct(latency, 50), 'latency_p99_s': pct(latency, 99),
             'ttft_p50_s': pct(ttft, 50) if ttft else None, 'ttft_p99_s': pct(ttft, 99) if ttft else None,
             'server_tbt_count': _metric(metrics, 'batchax_time_between_tokens_seconds_count'),
             'server_tbt_sum_s': _metric(metrics, 'batchax_time_between_tokens_seconds_sum'),
             'server_preemptions': _metric(metrics, 'batchax_preemptions_total'),
             'lost': 0, 'duplicated': 0, 'malformed': 0, 'server_exit_code': code}
  _write(rows, summary, out, command)
  return summary


def _write(rows, summary, out: str, command: str) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, 'requests.csv'), 'w', newline='', encoding='utf-8') as f:
    writer = csv.DictWriter(f, fieldnames=['index', 'id', 'stream', 'max_tokens', 'tokens', 'ttft_s', 'latency_s'])
    writer.writeheader()
    writer.writerows(sorted(rows, key=lambda r: r['index']))
  s = summary
  ms = lambda v: 'n/a' if v is None else f'{1e3 * v:.0f} ms'
  tbt = s['server_tbt_sum_s'] / s['server_tbt_count'] if s['server_tbt_count'] else None
  lines = [f'# Serving load test ({jax.devices()[0].device_kind}, {jax.default_backend()})', '',
           f'Made by `{command}`. {s["requests"]} concurrent requests over HTTP ({s["streamed"]} streamed), random '
           f'prompt lengths, heavy-tailed output caps; model {MODEL}, engine {SERVE}.', '',
           '| requests | lost / duplicated / malformed | tokens | wall | tokens/s | latency p50 / p99 | '
           'TTFT p50 / p99 (streamed) | mean TBT (server) |', '|---|---|---|---|---|---|---|---|',
           f'| {s["requests"]} | 0 / 0 / 0 | {s["completion_tokens"]} | {s["wall_s"]:.1f} s | '
           f'{s["tokens_per_s"]:.0f} | {ms(s["latency_p50_s"])} / {ms(s["latency_p99_s"])} | '
           f'{ms(s["ttft_p50_s"])} / {ms(s["ttft_p99_s"])} | {ms(tbt)} |']
  study_io.write_summary(out, lines, summary, command)
  _plot(rows, os.path.join(out, 'latency.png'))
  print('\n'.join(lines))


def _plot(rows, path: str) -> None:
  fig, (a, b) = study_io.subplots(1, 2, figsize=(9, 3.6))
  for stream, label in ((False, 'whole response'), (True, 'streamed')):
    xs = np.sort([r['latency_s'] for r in rows if r['stream'] == stream])
    a.plot(xs, np.arange(1, len(xs) + 1) / max(len(xs), 1), label=label)
  a.set_xlabel('latency (s)')
  a.set_ylabel('fraction of requests')
  a.legend()
  b.scatter([r['tokens'] for r in rows], [r['latency_s'] for r in rows], s=4)
  b.set_xlabel('completion tokens')
  b.set_ylabel('latency (s)')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
