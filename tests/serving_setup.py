"""What the launcher tests of the engine share (tests/test_generate_cli.py, tests/test_server.py): a small model,
a training checkpoint of it, and the engine's own outputs to compare the launchers against."""
import os
import pathlib
import subprocess
import sys

import jax

import configs.lm_tiny as lm_tiny
from framework import checkpoint as ckpt_lib
from framework import config as config_lib
from framework.inference.engine import Engine, serving_sharder
from framework.inference.requests import Request
from framework.inference.sampling import SamplingParams
from framework.mesh import make_sharder
from framework.train import Trainer

REPO = pathlib.Path(__file__).resolve().parent.parent
MODEL = dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=64)
SERVE = dict(slots=4, page_size=8, prefill_chunk=16)
OVERRIDES = ([f'--config.model.{k}={v}' for k, v in MODEL.items()] + ['--config.data.seq_len=64'] +
             [f'--config.inference.{k}={v}' for k, v in SERVE.items()])


def small_cfg(**mesh):
  cfg = lm_tiny.get_config()
  cfg.model.update(**MODEL)
  cfg.data.seq_len = 64
  cfg.inference.update(**SERVE)
  cfg.mesh.update(**mesh)
  config_lib.validate(cfg, num_devices=len(jax.devices()))
  return cfg


def save_run(workdir: pathlib.Path):
  """A training run's checkpoint (step 7), saved from an fsdp=2 x data=4 mesh on 8 devices; returns its params."""
  cfg = small_cfg(fsdp=2)
  trainer = Trainer(cfg, make_sharder(cfg))
  state = trainer.init(jax.random.key(3))
  checkpointer = ckpt_lib.Checkpointer(str(workdir / 'checkpoints'), cfg.checkpoint)
  assert checkpointer.save(7, state, {}, ckpt_lib.config_to_json(cfg), force=True)
  checkpointer.wait()
  checkpointer.close()
  return jax.device_get(state.params)


def expected(params, prompts, max_tokens, **sampling):
  """The engine's Python API on one device: what a launcher serving `params` must answer."""
  cfg = small_cfg()
  engine = Engine(cfg, params, sharder=serving_sharder(cfg, jax.devices()[:1]))
  return engine.generate([Request(prompt=p, tokens=None, sampling=SamplingParams(max_tokens=max_tokens, **sampling))
                          if isinstance(p, str) else Request(tokens=p, sampling=SamplingParams(
                              max_tokens=max_tokens, **sampling)) for p in prompts])


def launcher_env() -> dict:
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env['JAX_PLATFORMS'] = 'cpu'
  return env


def launch(module: str, *args, timeout=300):
  return subprocess.run([sys.executable, '-m', module, '--cpu_devices=2', *args], cwd=REPO, env=launcher_env(),
                        capture_output=True, text=True, timeout=timeout)
