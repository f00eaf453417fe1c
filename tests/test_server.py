"""`python -m launch.serve` end to end: the real server in a subprocess on a free loopback port, talked to over HTTP
with httpx. Outputs equal the engine's Python API (streaming and not, chat through a template); bad requests get
400 naming the field while others complete; a full queue answers 429 with Retry-After; a client that disconnects
mid-stream frees its slots and pages; SIGTERM lets in-flight requests finish and exits 0."""
import concurrent.futures
import json
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from serving_setup import OVERRIDES, REPO, expected, launch, launcher_env, save_run

CONTEXT = 1024
TEMPLATE = '{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:'


class Server:
  """launch.serve in a subprocess; `url` once its ready line is out."""

  def __init__(self, workdir, tmp, *args):
    template = tmp / 'chat.jinja'
    template.write_text(TEMPLATE)
    cmd = [sys.executable, '-m', 'launch.serve', '--cpu_devices=2', '--config=configs/lm_tiny.py',
           f'--workdir={workdir}', '--port=0', f'--chat_template={template}', '--config.serving.max_queue=2',
           '--config.serving.model_name=tiny', *OVERRIDES, *args]
    # A longer context than the checkpoint trained with (RoPE has no position table): requests long enough that
    # the queue stays full while the test looks at it.
    cmd.append(f'--config.model.max_seq_len={CONTEXT}')
    self.proc = subprocess.Popen(cmd, cwd=REPO, env=launcher_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True)
    self.lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [self.lines.put(line) for line in self.proc.stdout], daemon=True).start()
    self.url = None
    deadline = time.monotonic() + 240
    while self.url is None:
      try:
        line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
      except queue.Empty:
        self.proc.kill()
        raise AssertionError(f'no ready line: {self.proc.stderr.read()[-3000:]}') from None
      if line.startswith('serving tiny on http://'):
        self.url = line.split()[-1]
    self.client = httpx.Client(base_url=self.url, timeout=120)

  def post(self, path, body):
    return self.client.post(path, content=body if isinstance(body, str) else json.dumps(body))

  def stop(self):
    if self.proc.poll() is None:
      self.proc.kill()
    self.client.close()


@pytest.fixture(scope='module')
def served(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('run')
  params = save_run(workdir)
  server = Server(workdir, tmp_path_factory.mktemp('serve'))
  yield server, params
  server.stop()


def greedy(prompt, max_tokens=8, **extra):
  return {'model': 'tiny', 'prompt': prompt, 'max_tokens': max_tokens, 'temperature': 0, **extra}


def sse_events(response):
  """The data of each server-sent event, [DONE] included."""
  out = []
  for line in response.iter_lines():
    if line.startswith('data: '):
      data = line[len('data: '):]
      out.append(data if data == '[DONE]' else json.loads(data))
  return out


def test_completions_equal_the_engine_api(served):
  server, params = served
  prompts = ['hello there', 'the cat']
  want = expected(params, prompts + [[1, 50, 60, 70]], 8, logprobs=True)
  r = server.post('/v1/completions', greedy(prompts))
  assert r.status_code == 200, r.text
  body = r.json()
  assert body['object'] == 'text_completion' and body['model'] == 'tiny'
  assert [c['text'] for c in body['choices']] == [w.text for w in want[:2]]
  assert [c['finish_reason'] for c in body['choices']] == [w.finish_reason for w in want[:2]]
  assert body['usage']['completion_tokens'] == sum(len(w.tokens) for w in want[:2])
  assert body['usage']['prompt_tokens'] == sum(w.prompt_tokens for w in want[:2])
  r = server.post('/v1/completions', greedy([1, 50, 60, 70], logprobs=0))
  (choice,) = r.json()['choices']
  assert choice['logprobs']['token_logprobs'] == pytest.approx(want[2].logprobs, abs=1e-5)
  assert choice['text'] == want[2].text
  for prompt, w in zip(prompts, want):
    with server.client.stream('POST', '/v1/completions', json=greedy(prompt, stream=True,
                                                                     stream_options={'include_usage': True})) as s:
      assert s.status_code == 200 and s.headers['content-type'].startswith('text/event-stream')
      events = sse_events(s)
    assert events[-1] == '[DONE]' and events[-2]['usage']['completion_tokens'] == len(w.tokens)
    chunks = [e['choices'][0] for e in events[:-2]]
    assert ''.join(c['text'] for c in chunks) == w.text
    assert [c['finish_reason'] for c in chunks][-1] == w.finish_reason
    assert all(c['finish_reason'] is None for c in chunks[:-1])


def test_n_samples_are_seeded_seed_plus_j_like_the_engine(served):
  server, params = served
  r = server.post('/v1/completions', {'prompt': 'hello', 'max_tokens': 6, 'temperature': 0.9, 'n': 2, 'seed': 11})
  got = [c['text'] for c in r.json()['choices']]
  want = [expected(params, ['hello'], 6, temperature=0.9, seed=s)[0].text for s in (11, 12)]
  assert got == want


def test_chat_completion_renders_the_template(served):
  server, params = served
  messages = [{'role': 'system', 'content': 'be brief'}, {'role': 'user', 'content': [{'type': 'text',
                                                                                        'text': 'hi'}]}]
  (want,) = expected(params, ['system: be brief\nuser: hi\nassistant:'], 6)
  r = server.post('/v1/chat/completions', {'messages': messages, 'max_tokens': 6, 'temperature': 0})
  assert r.status_code == 200, r.text
  (choice,) = r.json()['choices']
  assert choice['message'] == {'role': 'assistant', 'content': want.text}
  with server.client.stream('POST', '/v1/chat/completions',
                            json={'messages': messages, 'max_tokens': 6, 'temperature': 0, 'stream': True}) as s:
    events = sse_events(s)
  deltas = [e['choices'][0]['delta'] for e in events[:-1]]
  assert deltas[0]['role'] == 'assistant' and ''.join(d.get('content', '') for d in deltas) == want.text


BAD = [
    ({'prompt': 'x', 'best_of': 3}, 400, 'best_of'),
    ({'prompt': 'x', 'presence_penalty': 0.5}, 400, 'presence_penalty'),
    ({'prompt': 'x', 'wat': 1}, 400, 'wat'),
    ({'prompt': 'x', 'temperature': 'hot'}, 400, 'temperature'),
    ({'prompt': 'x', 'top_p': 0}, 400, 'top_p'),
    ({'prompt': 'x', 'max_tokens': 0}, 400, 'max_tokens'),
    ({'prompt': 'x' * CONTEXT}, 400, 'prompt'),                   # over the context
    ({'prompt': [5, 9999]}, 400, 'tokens'),                       # outside the vocabulary
    ({'prompt': ''}, 400, 'prompt'),
    ({'prompt': 'x', 'n': 0}, 400, 'n'),
    ({'prompt': 'x', 'n': 7}, 400, 'n'),                          # more than slots + max_queue
    ({'prompt': 'x', 'stream_options': {'include_usage': True}}, 400, 'stream_options'),
    ({'prompt': 'x', 'logprobs': 3}, 400, 'logprobs'),
    ({'prompt': 'x', 'model': 'gpt-4'}, 404, 'model'),
    ('{"prompt": ', 400, None),
    ([1, 2], 400, None),
]


def test_bad_requests_get_400_naming_the_field_while_others_complete(served):
  server, params = served
  good = ['once upon', 'a time', 'there was']
  want = expected(params, good, 10)
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    goods = [pool.submit(server.post, '/v1/completions', greedy(p, 10)) for p in good]
    bads = [pool.submit(server.post, '/v1/completions', body) for body, _, _ in BAD]
    chat = pool.submit(server.post, '/v1/chat/completions', {'messages': 'hi'})
  for future, (_, status, param) in zip(bads, BAD):
    r = future.result()
    assert r.status_code == status, (param, r.text)
    error = r.json()['error']
    assert error['param'] == param and error['message'] and error['type']
    if param:
      assert error['message'].startswith(param)
  assert chat.result().status_code == 400 and chat.result().json()['error']['param'] == 'messages'
  assert [f.result().json()['choices'][0]['text'] for f in goods] == [w.text for w in want]


def health(server):
  return server.client.get('/health').json()


def metric(server, name):
  for line in server.client.get('/metrics').text.splitlines():
    if line.startswith(name + ' '):
      return float(line.split()[-1])
  return 0.0


def test_full_queue_answers_429_and_a_disconnect_frees_the_slots(served):
  server, _ = served
  body = {'prompt': 'x', 'max_tokens': CONTEXT - 8, 'temperature': 0, 'ignore_eos': True, 'n': 6, 'stream': True}
  with server.client.stream('POST', '/v1/completions', json=body) as s:
    lines = s.iter_lines()  # held: a dropped iterator closes the connection (httpcore), a disconnect
    first = next(lines)
    assert first.startswith('data: ')
    h = health(server)
    assert h['running'] + h['waiting'] == 6 and h['running'] <= 4  # slots 4, max_queue 2: full
    full = server.post('/v1/completions', greedy('y'))
    assert full.status_code == 429 and full.headers['retry-after'] == '1'
    assert full.json()['error']['code'] == 'queue_full'
  # The stream is closed: the server must cancel all six and give back their slots and pages.
  deadline = time.monotonic() + 60
  while time.monotonic() < deadline:
    h = health(server)
    if h['running'] == h['waiting'] == h['kv_pages_used'] == 0:
      break
    time.sleep(0.1)
  assert h['running'] == h['waiting'] == h['kv_pages_used'] == 0, h
  assert metric(server, 'batchax_requests_total{outcome="cancelled"}') >= 6
  assert metric(server, 'batchax_requests_total{outcome="rejected_429"}') >= 1
  assert server.post('/v1/completions', greedy('y')).status_code == 200  # room again


def test_models_health_and_metrics(served):
  server, _ = served
  assert server.client.get('/v1/models').json()['data'][0]['id'] == 'tiny'
  assert health(server)['status'] == 'ok' and health(server)['kv_pages_total'] == 4 * CONTEXT // 8
  text = server.client.get('/metrics').text
  for name in ('batchax_queue_length', 'batchax_running_requests', 'batchax_kv_pages_used',
               'batchax_tokens_per_second', 'batchax_time_to_first_token_seconds_bucket',
               'batchax_time_between_tokens_seconds_count', 'batchax_generated_tokens_total'):
    assert name in text
  assert metric(server, 'batchax_generated_tokens_total') > 0
  assert server.client.get('/nope').json()['error']['message'] == 'Not Found'


def test_sigterm_finishes_in_flight_requests_and_exits_0(served):
  server, _ = served
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    inflight = pool.submit(server.post, '/v1/completions',
                           {'prompt': 'hello', 'max_tokens': 40, 'temperature': 0, 'ignore_eos': True})
    deadline = time.monotonic() + 60
    while health(server)['running'] == 0 and time.monotonic() < deadline:
      time.sleep(0.02)
    server.proc.send_signal(signal.SIGTERM)
    r = inflight.result(timeout=120)
  assert r.status_code == 200 and r.json()['usage']['completion_tokens'] == 40
  assert server.proc.wait(timeout=120) == 0, server.proc.stderr.read()[-3000:]
  deadline = time.monotonic() + 10
  while 'server stopped\n' not in server.lines.queue and time.monotonic() < deadline:
    time.sleep(0.05)  # the reader thread catches up with the exited process's last lines
  assert 'server stopped\n' in server.lines.queue
  with pytest.raises(httpx.ConnectError):
    server.client.get('/health')


@pytest.mark.parametrize('args, message', [
    (['--port=70000'], '--port: 70000 is not a TCP port'),
    (['--port={busy}'], 'cannot listen on 127.0.0.1:{busy}'),
    (['--chat_template=/nonexistent.jinja'], '--chat_template: /nonexistent.jinja is not a file'),
], ids=['bad_port', 'busy_port', 'no_template'])
def test_user_errors_print_one_line(tmp_path, args, message):
  with socket.socket() as busy:
    busy.bind(('127.0.0.1', 0))
    busy.listen()
    port = busy.getsockname()[1]
    workdir = tmp_path / 'run'
    workdir.mkdir()
    (workdir / 'checkpoints').mkdir()
    proc = launch('launch.serve', '--config=configs/lm_tiny.py', f'--workdir={workdir}', *OVERRIDES,
                  *[a.format(busy=port) for a in args], timeout=120)
  assert proc.returncode != 0
  assert message.format(busy=port) in proc.stderr, proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr


def test_a_request_past_its_timeout_gets_504_or_an_error_event():
  """In-process (the app over a real engine worker): serving.request_timeout_s cuts a long request."""
  from fastapi.testclient import TestClient

  from framework.inference import server as server_lib
  from framework.inference.worker import EngineWorker
  from test_worker import new_engine
  engine = new_engine()
  step = engine.step

  def slow_step():  # 30 ms a step whatever the machine: 50 tokens cannot finish within the timeout
    time.sleep(0.03)
    return step()

  engine.step = slow_step
  cfg = engine.cfg.copy_and_resolve_references()
  cfg.serving.request_timeout_s = 0.5
  worker = EngineWorker(engine, max_queue=4)
  worker.start()
  long = {'prompt': 'hello', 'max_tokens': 50, 'temperature': 0, 'ignore_eos': True}
  with TestClient(server_lib.create_app(worker, engine.codec, cfg, 'tiny')) as client:
    r = client.post('/v1/completions', json=long)
    assert r.status_code == 504 and r.json()['error']['code'] == 'timeout', r.text
    with client.stream('POST', '/v1/completions', json=dict(long, stream=True)) as s:
      events = sse_events(s)
    assert events[-1] == '[DONE]' and events[-2]['error']['code'] == 'timeout'
    assert client.post('/v1/completions', json=dict(long, max_tokens=2)).status_code == 200
  assert not worker.alive  # the app's shutdown drained and stopped the worker
