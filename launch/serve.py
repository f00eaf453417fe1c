"""Serve a model over HTTP with the OpenAI API (framework/inference/server.py) on the batched inference engine.

  python -m launch.serve --config=configs/lm_tiny.py --workdir=/tmp/run --host=127.0.0.1 --port=8000
  python -m launch.serve --model_dir=/path/to/llama [--chat_template=template.jinja] --port=8000
  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \
      -d '{"prompt": "Once upon a time", "max_tokens": 32, "temperature": 0}'

Prints one line when it is ready to take requests (`serving <model> on http://host:port`; --port=0 picks a free
port and the line names it). SIGTERM or Ctrl-C: stop admitting (new requests get 503), give in-flight requests
serving.shutdown_timeout_s to finish, cancel the rest, exit 0. The engine's step is compiled before the ready
line (--warmup) so the first requests do not wait for it.
"""
import signal
import socket

from absl import app, flags

from launch import model_flags, runtime_flags

_HOST = flags.DEFINE_string('host', '127.0.0.1', 'Interface to listen on (0.0.0.0: every interface).')
_PORT = flags.DEFINE_integer('port', 8000, 'TCP port; 0 picks a free one (the ready line names it).')
_CHAT_TEMPLATE = flags.DEFINE_string('chat_template', None, 'A Jinja chat template file for /v1/chat/completions '
                                     '(default: --model_dir\'s tokenizer_config.json "chat_template", if any).')
_WARMUP = flags.DEFINE_bool('warmup', True, 'Compile the engine step with one request before taking requests.')


def run() -> None:
  if not 0 <= _PORT.value < 65536:
    raise ValueError(f'--port: {_PORT.value} is not a TCP port; give 0-65535 (0: any free port)')
  cfg = model_flags.load_config()
  sock = _listen(_HOST.value, _PORT.value)  # before loading the model: a taken port fails at once
  import uvicorn  # pylint: disable=g-import-not-at-top  (the `serve` extra)
  from framework.inference import openai_api, server  # pylint: disable=g-import-not-at-top
  from framework.inference.requests import Request  # pylint: disable=g-import-not-at-top
  from framework.inference.sampling import SamplingParams  # pylint: disable=g-import-not-at-top
  from framework.inference.worker import EngineWorker  # pylint: disable=g-import-not-at-top

  template = openai_api.load_chat_template(model_flags.MODEL_DIR.value, _CHAT_TEMPLATE.value)
  engine = model_flags.build_engine(cfg)
  if _WARMUP.value:
    engine.generate([Request(tokens=[0], sampling=SamplingParams(max_tokens=2, ignore_eos=True))])
  name = model_flags.model_name(cfg)
  worker = EngineWorker(engine, cfg.serving.max_queue)
  worker.start()
  app_ = server.create_app(worker, engine.codec, cfg, name, template)
  config = uvicorn.Config(app_, host=_HOST.value, port=_PORT.value, log_level='warning', access_log=False,
                          timeout_graceful_shutdown=int(cfg.serving.shutdown_timeout_s) + 1, lifespan='on')
  srv = _server(config, worker, name)
  # uvicorn restores the handlers it found and re-raises the signal it caught once it has shut down; a no-op
  # handler found here turns that re-raise into a normal return, so a SIGTERM shutdown exits 0.
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda *_: None)
  srv.run(sockets=[sock])
  print('server stopped', flush=True)


def _listen(host: str, port: int) -> socket.socket:
  sock = socket.socket(socket.AF_INET6 if ':' in host else socket.AF_INET)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try:
    sock.bind((host, port))
  except OSError as e:
    sock.close()
    raise OSError(f'--host/--port: cannot listen on {host}:{port} ({e.strerror})') from None
  return sock


def _server(config, worker, name):
  """A uvicorn.Server that marks the worker as draining the moment a signal arrives and prints the ready line."""
  import uvicorn  # pylint: disable=g-import-not-at-top  (the `serve` extra)

  class Server(uvicorn.Server):

    def handle_exit(self, sig, frame):
      worker.draining = True
      super().handle_exit(sig, frame)

    async def startup(self, sockets=None):
      await super().startup(sockets)
      if self.started:
        host, port = self.servers[0].sockets[0].getsockname()[:2]
        print(f'serving {name} on http://{host}:{port}', flush=True)

  return Server(config)


if __name__ == '__main__':
  app.run(runtime_flags.main_of(run, serving=True), flags_parser=runtime_flags.parse_flags)
