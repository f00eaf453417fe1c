"""The inference engine serving the recurrent-memory model (framework/inference/armt_forward.py) against full
recompute by the training model: ARMT.forward with the sequential executor over the whole sequence at every
step. Prompts and outputs cross segment ends in prefill and in decode, chunks do not divide a segment, there are
more requests than slots and the KV pool is small enough that admission and preemption act; W_V is random, so
the memory carries information from segment to segment."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import configs.lm_tiny as lm_tiny
from framework import config as config_lib
from framework.inference import loading
from framework.inference.engine import Engine, serving_sharder
from framework.inference.requests import Request
from framework.inference.sampling import SamplingParams
from framework.mesh import make_sharder
from framework.models.armt import ARMT
from framework.models.armt_config import ARMTConfig
from framework.train import Trainer

EOS = 2
SEG, MEM = 12, 3


def armt_cfg(**inference):
  cfg = lm_tiny.get_config()
  cfg.model.update(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=72, attention_impl='xla')
  cfg.data.seq_len = 72
  cfg.armt.update(segment_len=SEG, memory_tokens=MEM, d_mem=8, executor='sequential')
  # A segment and its memory rows take 4 pages of 4; 3 slots of up to 4 pages share 9 usable pages.
  cfg.inference.update(slots=3, page_size=4, prefill_chunk=8, prefill_rows=2, kv_pages=10)
  cfg.inference.update(**inference)
  config_lib.validate(cfg, num_devices=1)
  return cfg


_MODEL = {}


def model(cfg):
  """(trainer, params): a random ARMT with large random memory projections (W_V's init is zero: an empty
  memory), so that what the memory recalls changes the greedy tokens (test_memory_changes_the_tokens)."""
  if 'params' not in _MODEL:
    trainer = Trainer(cfg, make_sharder(cfg, jax.devices()[:1]))
    params = jax.device_get(trainer.init(jax.random.key(0)).params)
    rng = np.random.default_rng(0)
    for name in ('mem_wq', 'mem_wk', 'mem_wv'):  # O(1) keys and queries: the recall moves the logits
      params[name] = (0.3 * rng.standard_normal(params[name].shape)).astype(params[name].dtype)
    _MODEL.update(trainer=trainer, params=params)
  return _MODEL['trainer'], _MODEL['params']


def full_recompute(cfg, prompt, max_tokens):
  trainer, params = model(cfg)
  key = ('fn', cfg.armt.memory)
  if key not in _MODEL:
    net = ARMT(dataclasses.replace(trainer.model_cfg, armt=ARMTConfig.from_config(cfg)), trainer.sharder)
    _MODEL[key] = jax.jit(lambda p, toks, n: net.apply({'params': p}, toks, None, None, n,
                                                         method=ARMT.forward)[0][0])
  toks, out, logprobs = list(prompt), [], []
  for _ in range(min(max_tokens, cfg.model.max_seq_len - len(prompt))):
    padded = np.zeros((1, cfg.model.max_seq_len), np.int32)  # the padding is masked and after every real token
    padded[0, :len(toks)] = toks
    logits = np.asarray(_MODEL[key](params, jnp.asarray(padded), len(toks))[len(toks) - 1])
    t = int(np.argmax(logits))
    if t == EOS:
      break
    out.append(t)
    logprobs.append(float(jax.nn.log_softmax(logits)[t]))
    toks.append(t)
  return out, logprobs


def requests():
  rng = np.random.default_rng(3)
  shapes = [(1, 30), (5, 20), (11, 14), (12, 9), (13, 25), (25, 16), (40, 12), (7, 3)]
  return [Request(tokens=rng.integers(3, 259, p).tolist(), id=f'r{i}',
                  sampling=SamplingParams(max_tokens=n, logprobs=True)) for i, (p, n) in enumerate(shapes)]


# scan_unroll 0: on CPU the engine holds per-layer weights and runs the layers one by one; 1: the stacks in a
# rolled loop, as on GPU and TPU.
# The stacked case runs with -m slow (tests/test_inference.py covers the stacked loop by default).
@pytest.mark.parametrize('scan_unroll', [0, pytest.param(1, marks=pytest.mark.slow)], ids=['per_layer', 'stacked'])
def test_greedy_equals_full_recompute_across_segments(scan_unroll):
  cfg = armt_cfg()
  cfg.model.scan_unroll = scan_unroll
  _, params = model(cfg)
  eng = Engine(cfg, params, sharder=serving_sharder(cfg, jax.devices()[:1]))
  assert isinstance(eng.params['layers'], tuple) == (scan_unroll == 0)
  reqs = requests()
  results = eng.generate(reqs)
  stats = eng.kv_stats()
  assert [r.id for r in results] == [q.id for q in reqs]
  for r, q in zip(results, reqs):
    tokens, logprobs = full_recompute(cfg, q.tokens, q.sampling.max_tokens)
    assert r.tokens == tokens, (r.id, r.tokens, tokens)
    np.testing.assert_allclose(r.logprobs, logprobs, atol=2e-4)
  # Every segment completed before a sequence's last step was written (a preempted sequence's, again).
  assert eng.memory_writes >= sum((len(q.tokens) + len(r.tokens) - 2) // SEG for q, r in zip(reqs, results)) > 0
  assert stats['preemptions'] > 0 and stats['kv_pages_used'] == 0, stats
  assert stats['kv_pages_peak'] <= 9 and stats['shared_pages'] == 0


def test_tensor_parallel_equals_full_recompute():
  cfg = armt_cfg()
  cfg.mesh.update(data=1, tensor=2)
  _, params = model(armt_cfg())
  eng = Engine(cfg, params, sharder=serving_sharder(cfg, jax.devices()[:2]))
  assert eng.cache.k.sharding.spec[3] == 'tensor'  # kv heads split
  reqs = requests()[2:6]
  for r, q in zip(eng.generate(reqs), reqs):
    assert r.tokens == full_recompute(cfg, q.tokens, q.sampling.max_tokens)[0], r.id


def test_memory_changes_the_tokens():
  """armt.memory=False (the ablation: no reads, no writes) serves its own model exactly, and the memory model's
  tokens differ from it: the equality above is sensitive to the memory."""
  with_memory, without = armt_cfg(), armt_cfg()
  without.armt.memory = False
  _, params = model(with_memory)
  reqs = requests()[:4]
  results = Engine(without, params, sharder=serving_sharder(without, jax.devices()[:1])).generate(reqs)
  differ = 0
  for r, q in zip(results, reqs):
    assert r.tokens == full_recompute(without, q.tokens, q.sampling.max_tokens)[0], r.id
    differ += r.tokens != full_recompute(with_memory, q.tokens, q.sampling.max_tokens)[0]
  assert differ >= 2, differ


def test_kv_pages_stay_at_one_segment_however_long_the_sequence():
  cfg = armt_cfg(slots=1, kv_pages=5)  # 4 usable pages: one segment and its memory rows
  _, params = model(cfg)
  eng = Engine(cfg, params, sharder=serving_sharder(cfg, jax.devices()[:1]))
  req = Request(tokens=list(range(3, 30)), sampling=SamplingParams(max_tokens=60, ignore_eos=True))
  (result,) = eng.generate([req])
  assert len(req.tokens) + len(result.tokens) == cfg.model.max_seq_len  # capped by the context: six segments
  assert eng.kv_stats()['kv_pages_peak'] == 4 and eng.kv_stats()['preemptions'] == 0


def test_loading_shapes_and_refusals():
  cfg = armt_cfg()
  trainer, params = model(cfg)
  abstract = loading.abstract_params(cfg, serving_sharder(cfg, jax.devices()[:1]))
  assert jax.tree.map(lambda a: (a.shape, a.dtype), abstract) == jax.tree.map(lambda a: (a.shape, a.dtype), params)
  with pytest.raises(ValueError, match='armt.segment_len'):
    Engine(cfg, params, sharder=serving_sharder(cfg, jax.devices()[:1]), draft=(cfg, params))
  saved = {'armt': {'segment_len': SEG, 'memory_tokens': MEM + 1, 'd_mem': 8, 'memory': True}}
  with pytest.raises(ValueError, match='armt.memory_tokens'):
    loading.check_saved_model(cfg, saved)
  del trainer
