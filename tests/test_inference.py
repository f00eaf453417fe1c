"""The inference engine against one-request-at-a-time generation by the training model without a cache.

Every case here runs continuous batching (fewer slots than requests), chunked prefill (chunks shorter than the
prompts) and prefix sharing (prompts with a common prefix), so each equality covers all three at once.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import configs.lm_tiny as lm_tiny
from framework import config as config_lib
from framework.inference import kv_cache, sampling
from framework.inference.engine import Engine, serving_sharder
from framework.inference.forward import inference_model_config
from framework.inference.requests import Request
from framework.inference.sampling import SamplingParams
from framework.mesh import make_sharder
from framework.train import Trainer

EOS = 2


def small_cfg(moe_every=0, **inference):
  cfg = lm_tiny.get_config()
  cfg.model.update(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=64)
  cfg.data.seq_len = 64
  if moe_every:
    cfg.moe.update(num_experts=4, top_k=2, d_ff_expert=64, every=moe_every, dispatch='capacity')
  # 15 usable pages for 4 slots of up to 8 pages each: admission control and preemption act in every case, and
  # every case shares one pool shape, so the engines' compiled steps are shared.
  cfg.inference.update(slots=4, page_size=8, prefill_chunk=16, prefill_rows=2, kv_pages=16)
  cfg.inference.update(**inference)
  config_lib.validate(cfg, num_devices=1)
  return cfg


_MODELS = {}


def model(cfg):
  """(trainer, params) of a randomly initialised model on one device (cached per model shape)."""
  key = (cfg.model.to_json(), cfg.moe.to_json())
  if key not in _MODELS:
    one = cfg.copy_and_resolve_references()
    one.mesh.update(data=1, fsdp=1, expert=1, tensor=1)  # whatever mesh the engine will serve on
    trainer = Trainer(one, make_sharder(one, jax.devices()[:1]))
    _MODELS[key] = trainer, trainer.init(jax.random.key(0)).params
  return _MODELS[key]


def engine(cfg, devices=None):
  _, params = model(cfg)
  sharder = serving_sharder(cfg, devices or jax.devices()[:1])
  return Engine(cfg, jax.device_get(params), sharder=sharder)


def full_recompute(cfg, prompt, max_tokens):
  """Greedy tokens and their logprobs from the training model over the whole sequence at every step."""
  trainer, params = model(cfg)
  fn = _recompute_fn(trainer)
  toks, out, logprobs = list(prompt), [], []
  for _ in range(min(max_tokens, cfg.model.max_seq_len - len(prompt))):
    padded = np.zeros((1, cfg.model.max_seq_len), np.int32)  # causal: what follows a position cannot change it
    padded[0, :len(toks)] = toks
    logits = np.asarray(fn(params, jnp.asarray(padded))[len(toks) - 1])
    t = int(np.argmax(logits))
    if t == EOS:
      break
    out.append(t)
    logprobs.append(float(jax.nn.log_softmax(logits)[t]))
    toks.append(t)
  return out, logprobs


_FNS = {}


def _recompute_fn(trainer):
  if id(trainer) not in _FNS:
    # The same modules without a cache, but dropless like the engine: a capacity limit would make the
    # reference itself depend on how many tokens share its step.
    net = type(trainer.model)(inference_model_config(trainer.model_cfg), trainer.sharder)

    @jax.jit
    def fn(params, toks):
      pos = jnp.arange(toks.shape[1])[None]
      return net.apply({'params': params}, toks, pos, jnp.ones_like(toks))[0][0]
    _FNS[id(trainer)] = fn
  return _FNS[id(trainer)]


def workload(seed, n, common_len=20, max_prompt=30, max_tokens=12):
  """n requests, every other one starting with the same common_len tokens."""
  rng = np.random.default_rng(seed)
  common = rng.integers(3, 259, common_len).tolist()
  reqs = []
  for i in range(n):
    own = rng.integers(3, 259, int(rng.integers(1, max_prompt - common_len))).tolist()
    reqs.append(Request(tokens=(common if i % 2 else []) + own, id=f'r{i}',
                        sampling=SamplingParams(max_tokens=int(rng.integers(4, max_tokens)), logprobs=True)))
  return reqs


# The every-layer MoE case runs by default: it covers the dense attention path plus the MoE layers.
@pytest.mark.parametrize('moe_every', [pytest.param(0, marks=pytest.mark.slow), 1,
                                       pytest.param(2, marks=pytest.mark.slow)], ids=['dense', 'moe', 'moe_every2'])
def test_greedy_equals_full_recompute(moe_every):
  cfg = small_cfg(moe_every)
  eng = engine(cfg)
  reqs = workload(0, 10)
  results = eng.generate(reqs)
  stats = eng.kv_stats()
  assert stats['shared_pages'] > 0 and stats['prefix_steps'] > 0, stats  # sharing and Hydragen really ran
  assert stats['kv_pages_used'] == 0, 'pages left held after the engine drained'
  assert [r.id for r in results] == [q.id for q in reqs]
  for r, q in zip(results, reqs):
    tokens, logprobs = full_recompute(cfg, q.tokens, q.sampling.max_tokens)
    assert r.tokens == tokens, (r.id, r.tokens, tokens)
    np.testing.assert_allclose(r.logprobs, logprobs, atol=2e-4)
    assert r.finish_reason == ('stop' if len(tokens) < q.sampling.max_tokens else 'length')


@pytest.mark.slow
def test_prefix_sharing_off_gives_the_same_tokens_with_more_pages():
  reqs = workload(1, 8, common_len=40, max_prompt=50)
  on, off = engine(small_cfg()), engine(small_cfg(prefix_sharing=False))
  assert [r.tokens for r in on.generate(reqs)] == [r.tokens for r in off.generate(reqs)]
  assert on.kv_stats()['shared_pages'] > 0 and off.kv_stats()['shared_pages'] == 0
  assert on.kv_stats()['kv_pages_peak'] < off.kv_stats()['kv_pages_peak']


def test_preemption_under_a_small_pool_keeps_outputs():
  cfg = small_cfg()
  reqs = workload(2, 12, max_tokens=30)
  eng = engine(cfg)
  results = eng.generate(reqs)
  assert eng.kv_stats()['preemptions'] > 0
  assert eng.kv_stats()['kv_pages_used'] == 0
  for r, q in zip(results, reqs):
    assert r.tokens == full_recompute(cfg, q.tokens, q.sampling.max_tokens)[0], r.id


def test_batch_invariance_with_sampling():
  """A request's tokens do not depend on who shares its steps or when it arrives."""
  cfg = small_cfg()
  probe = Request(tokens=list(range(10, 40)), id='probe',
                  sampling=SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, top_k=50, seed=7))
  alone = engine(cfg).generate([probe])[0].tokens
  others = workload(3, 9, max_tokens=25)
  crowded = engine(cfg).generate(others[:4] + [probe] + others[4:])[4].tokens
  late = engine(cfg)
  late.generate(others[:3])  # the engine has served others first
  late_tokens = late.generate(others[3:] + [probe])[-1].tokens
  assert alone == crowded == late_tokens
  reseeded = engine(cfg).generate([Request(tokens=probe.tokens, sampling=SamplingParams(
      max_tokens=20, temperature=1.0, top_p=0.9, top_k=50, seed=8))])[0].tokens
  assert reseeded != alone


@pytest.mark.slow
def test_static_and_unchunked_scheduling_give_the_same_tokens():
  reqs = workload(4, 8)
  base = [r.tokens for r in engine(small_cfg()).generate(reqs)]
  assert [r.tokens for r in engine(small_cfg(scheduling='static')).generate(reqs)] == base
  assert [r.tokens for r in engine(small_cfg(prefill_chunk=64, prefill_rows=1)).generate(reqs)] == base


def test_bad_requests_get_errors_while_others_complete():
  cfg = small_cfg()
  good = Request(tokens=[5, 6, 7], sampling=SamplingParams(max_tokens=3))
  bad = [
      (Request(prompt=''), 'prompt: is empty'),
      (Request(tokens=[]), 'tokens: is empty'),
      (Request(tokens=[4] * 64), 'leave no room'),
      (Request(tokens=[3, 600]), 'outside the vocabulary'),
      (Request(tokens=[3, -1]), 'outside the vocabulary'),
      (Request(tokens=[3], sampling=SamplingParams(max_tokens=3, temperature=-1.0)), 'temperature'),
      (Request(tokens=[3], sampling=SamplingParams(max_tokens=3, top_p=0.0)), 'top_p'),
      (Request(tokens=[3], sampling=SamplingParams(max_tokens=3, top_k=-2)), 'top_k'),
      (Request(tokens=[3], sampling=SamplingParams(max_tokens=0)), 'max_tokens'),
      (Request(tokens=[3], sampling=SamplingParams(max_tokens=3, seed=-1)), 'seed'),
      (Request(tokens=[3], sampling=SamplingParams(max_tokens=3, stop=('',))), 'stop'),
      (Request(prompt='a', tokens=[3]), 'not both'),
      (Request(), 'prompt: missing'),
  ]
  results = engine(cfg).generate([good] + [b for b, _ in bad] + [good])
  assert results[0].finish_reason == results[-1].finish_reason == 'length'
  assert results[0].tokens == results[-1].tokens == full_recompute(cfg, good.tokens, 3)[0]
  for r, (_, message) in zip(results[1:-1], bad):
    assert r.finish_reason == 'error' and message in r.error, (message, r.error)


def test_stop_strings_eos_and_text():
  cfg = small_cfg()
  eng = engine(cfg)
  prompt = Request(prompt='hello', sampling=SamplingParams(max_tokens=20))
  full = eng.generate([prompt])[0]
  assert full.text == eng.codec.decode(full.tokens)
  assert len(full.text) >= 4
  stop = full.text[2:4]
  cut = eng.generate([Request(prompt='hello', sampling=SamplingParams(max_tokens=20, stop=(stop,)))])[0]
  assert cut.finish_reason == 'stop' and cut.text == full.text[:full.text.find(stop)]
  streamed = ''.join(e.text for e in eng.stream(
      [Request(prompt='hello', sampling=SamplingParams(max_tokens=20, stop=(stop,)))]))
  assert streamed == cut.text
  # A model whose every token is EOS: generation ends at once with 'stop' and no tokens.
  _, params = model(cfg)
  params = jax.device_get(params)
  params['head'] = np.zeros_like(params['head'])
  params['head'][:, EOS] = 1.0
  eos_eng = Engine(cfg, params, sharder=serving_sharder(cfg, jax.devices()[:1]))
  r = eos_eng.generate([Request(prompt='hi', sampling=SamplingParams(max_tokens=5))])[0]
  assert r.finish_reason == 'stop' and r.tokens == []
  r = eos_eng.generate([Request(prompt='hi', sampling=SamplingParams(max_tokens=5, ignore_eos=True))])[0]
  assert r.finish_reason == 'length' and r.tokens == [EOS] * 5


def test_streaming_events_match_results():
  cfg = small_cfg()
  reqs = workload(5, 6)
  events = list(engine(cfg).stream(reqs))
  results = engine(cfg).generate(reqs)
  for i, r in enumerate(results):
    mine = [e for e in events if e.index == i]
    assert [e.token for e in mine if e.token is not None] == r.tokens
    assert sum(e.finished for e in mine) == 1 and mine[-1].finished


def test_tensor_parallel_engine_equals_one_device():
  cfg = small_cfg()
  cfg.mesh.update(data=1, tensor=2)
  reqs = workload(6, 6)
  tp = engine(cfg, jax.devices()[:2])
  assert tp.cache.k.sharding.spec[3] == 'tensor'  # kv heads split
  assert tuple(tp.params['layers'][0]['attn']['wq'].sharding.spec) == ('fsdp', 'tensor', None)  # per layer, split
  one = small_cfg()
  assert [r.tokens for r in tp.generate(reqs)] == [r.tokens for r in engine(one).generate(reqs)]


@pytest.mark.parametrize('moe_every', [0, pytest.param(2, marks=pytest.mark.slow)], ids=['dense', 'moe_every2'])
def test_per_layer_weights_equal_the_stacked_loop(moe_every):
  """On CPU the engine holds each layer's weights on their own (forward.serving_params, layers unrolled in the
  step); with model.scan_unroll=1 it keeps the stacks and loops, as on GPU and TPU. Same tokens and logprobs."""
  cfg = small_cfg(moe_every)
  rolled = small_cfg(moe_every)
  rolled.model.scan_unroll = 1
  params = jax.device_get(model(cfg)[1])
  engines = [Engine(c, params, sharder=serving_sharder(c, jax.devices()[:1])) for c in (cfg, rolled)]
  assert isinstance(engines[0].params['layers'], tuple) and len(engines[0].params['layers']) == 2
  assert not isinstance(engines[1].params['layers'], tuple)
  if moe_every:  # depth order: the group's dense layer, then its MoE layer
    assert 'mlp' in engines[0].params['layers'][0] and 'moe' in engines[0].params['layers'][1]
    np.testing.assert_array_equal(engines[0].params['layers'][1]['moe']['wi_gate'],
                                  params['layers']['moe_block']['moe']['wi_gate'][0])
  reqs = workload(7, 6)
  per_layer, stacked = (e.generate(reqs) for e in engines)
  assert [r.tokens for r in per_layer] == [r.tokens for r in stacked]
  np.testing.assert_allclose(sum((r.logprobs for r in per_layer), []), sum((r.logprobs for r in stacked), []),
                             atol=1e-5)


def test_thousand_requests_under_a_small_kv_budget():
  """Random lengths, heavy-tailed outputs, some shared prefixes; admission and preemption must act."""
  cfg = small_cfg()  # 15 usable pages for 4 slots of up to 8
  rng = np.random.default_rng(0)
  prefixes = [rng.integers(3, 259, 16).tolist() for _ in range(4)]
  reqs = []
  for i in range(1000):
    prompt = rng.integers(3, 259, int(rng.integers(1, 30))).tolist()
    if i % 3 == 0:
      prompt = prefixes[i % 4] + prompt
    max_tokens = int(min(60, rng.pareto(1.5) * 4 + 1))  # heavy-tailed output caps
    reqs.append(Request(tokens=prompt, id=f'q{i}', sampling=SamplingParams(
        max_tokens=max_tokens, temperature=0.8, seed=i, ignore_eos=True)))
  eng = engine(cfg)
  results = eng.generate(reqs)
  assert [r.id for r in results] == [f'q{i}' for i in range(1000)]
  assert len({r.id for r in results}) == 1000
  for r, q in zip(results, reqs):
    assert r.error is None and r.finish_reason == 'length', r
    assert len(r.tokens) == min(q.sampling.max_tokens, cfg.model.max_seq_len - len(q.tokens))
  stats = eng.kv_stats()
  assert stats['kv_pages_used'] == 0 and stats['kv_pages_peak'] <= 15
  assert stats['preemptions'] > 0 and stats['shared_pages'] > 0, stats


def test_page_pool_counts_and_registry():
  pool = kv_cache.PagePool(5, 4)
  a = pool.allocate(3)
  assert pool.free == 1 and kv_cache.SCRATCH_PAGE not in a
  assert pool.allocate(2) is None and pool.free == 1
  keys = kv_cache.page_keys([1, 2, 3, 4, 5, 6, 7, 8], 4, 2)
  assert keys != kv_cache.page_keys([1, 2, 3, 9, 5, 6, 7, 8], 4, 2)
  assert keys[1] != kv_cache.page_keys([0, 2, 3, 4, 5, 6, 7, 8], 4, 2)[1]  # a page's key covers what precedes it
  pool.register(a[0], keys[0])
  assert pool.lookup(keys[0]) == a[0]
  pool.share(a[0])
  pool.release([a[0]])
  assert pool.lookup(keys[0]) == a[0] and pool.refcount(a[0]) == 1
  pool.release(a)
  assert pool.free == 4 and pool.lookup(keys[0]) is None
  with pytest.raises(RuntimeError, match='released more often'):
    pool.release([a[1]])


def test_sampling_filters_and_seeds():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 4000, jnp.float32))
  n = logits.shape[0]
  ones = jnp.ones(n, jnp.float32)
  seeds, counters = jnp.arange(n, dtype=jnp.uint32), jnp.zeros(n, jnp.int32)
  draw = lambda temp, k, p: np.asarray(sampling.sample(logits, temp * ones, jnp.full(n, k, jnp.int32), p * ones,
                                                       seeds, counters)[0])
  freq = np.bincount(draw(1.0, 0, 1.0), minlength=4) / n
  np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.03)
  freq = np.bincount(draw(1.0, 2, 1.0), minlength=4) / n  # top-2 renormalised: 5/8, 3/8
  np.testing.assert_allclose(freq, [0.625, 0.375, 0, 0], atol=0.03)
  freq = np.bincount(draw(1.0, 0, 0.7), minlength=4) / n  # the smallest set reaching 0.7: {0, 1}
  np.testing.assert_allclose(freq, [0.625, 0.375, 0, 0], atol=0.03)
  assert set(draw(0.0, 0, 1.0)) == {0} and set(draw(1.0, 1, 1.0)) == {0}
  np.testing.assert_array_equal(draw(1.0, 0, 1.0), draw(1.0, 0, 1.0))


def test_sampling_rows_do_not_depend_on_the_step():
  """Greedy, unfiltered and filtered rows in one step draw what each draws alone (a step sorts the vocabulary
  and draws only when some row needs it); an unfiltered row samples softmax(logits / temperature) exactly."""
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(6, 64)) * 3, jnp.float32)
  temperature = jnp.asarray([0.0, 1.0, 0.7, 1.0, 0.5, 0.0], jnp.float32)
  top_k = jnp.asarray([0, 0, 5, 0, 0, 3], jnp.int32)
  top_p = jnp.asarray([1.0, 1.0, 1.0, 0.8, 1.0, 0.5], jnp.float32)
  seeds = jnp.arange(6, dtype=jnp.uint32)
  fn = jax.jit(sampling.sample)
  for counter in range(20):
    counters = jnp.full(6, counter, jnp.int32)
    mixed = np.asarray(fn(logits, temperature, top_k, top_p, seeds, counters)[0])
    alone = [int(fn(*(a[i:i + 1] for a in (logits, temperature, top_k, top_p, seeds, counters)))[0][0])
             for i in range(6)]
    assert mixed.tolist() == alone, counter
  lp = np.asarray(sampling.filtered_logprobs(logits, temperature, top_k, top_p))
  scaled = np.asarray(logits[4], np.float64) / 0.5
  np.testing.assert_allclose(lp[4], scaled - np.log(np.exp(scaled - scaled.max()).sum()) - scaled.max(), atol=1e-4)
  assert np.isfinite(lp[2]).sum() == 5 and np.isfinite(lp[1]).all()
  assert np.isfinite(lp[0]).sum() == 1 and lp[0].argmax() == int(np.argmax(logits[0]))


def test_byte_text_stream_equals_decoding_everything():
  """The engine's token-by-token text (ByteTextStream) against ByteCodec.decode of the whole list after every
  token: multi-byte characters split over tokens, invalid bytes, specials and ids past the vocabulary."""
  from framework.inference.requests import ByteCodec  # pylint: disable=g-import-not-at-top
  codec = ByteCodec()
  rng = np.random.default_rng(0)
  text = 'añ€😀 ok \u0301x'.encode()
  for trial in range(200):
    if trial % 2:  # valid UTF-8 with specials and out-of-range ids mixed in
      ids = [b + 3 for b in text] + [0, 1, 2, 300]
      ids = [ids[i] for i in rng.permutation(len(ids))] if trial % 4 == 1 else ids
    else:  # any bytes: truncated and invalid sequences
      ids = rng.integers(0, 262, int(rng.integers(1, 40))).tolist()
    stream = codec.text_stream()
    for n, token in enumerate(ids, 1):
      stream.push(token)
      assert stream.decoded() == codec.decode(ids[:n]), (trial, ids[:n])


def test_streamed_text_is_complete_when_eos_ends_a_held_back_tail():
  """Text held back for a possible stop string goes out with the EOS that ends the request."""
  from framework.inference.scheduler import Sequence
  eng = engine(small_cfg())
  params = SamplingParams(max_tokens=20, stop=('###',))
  seq = Sequence(index=0, id='s', prompt=[1], params=params, max_new=20, arrival=0.0)
  eng._results.clear()
  streamed = ''.join(e.text for t in 'Hello'.encode() for e in eng.append_token(seq, t + 3, 0.0, 1.0))
  assert streamed == 'Hel'  # two characters held: they could start '###'
  events = eng.append_token(seq, EOS, 0.0, 2.0)
  assert events[0].finished and events[0].finish_reason == 'stop'
  assert streamed + events[0].text == 'Hello' == eng.result(0).text


def test_ragged_decode_attention_equals_attention_over_page_tables():
  """forward.Attend.ragged (the decode rows' pages back to back, as the engine builds them on CPU) against the
  page-table reference (pallas_kernels' decode_attention_reference): rows of 0 to 27 tokens, GQA, padding
  entries; an empty row gets lse -inf."""
  from framework.inference import engine as engine_lib  # pylint: disable=g-import-not-at-top
  from framework.inference.forward import Attend  # pylint: disable=g-import-not-at-top
  from pallas_kernels.decode_attention.reference import decode_attention_reference  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  num_pages, page, kv_heads, group, d = 40, 4, 2, 3, 8
  k_layer, v_layer = (jnp.asarray(rng.normal(size=(num_pages, page, kv_heads, d)), jnp.float32) for _ in range(2))
  lengths = np.array([0, 1, 4, 5, 13, 27], np.int32)
  rows = [rng.choice(np.arange(1, num_pages), size=-(-n // page), replace=False).tolist() for n in lengths]
  q = jnp.asarray(rng.normal(size=(len(rows), 1, kv_heads * group, d)), jnp.float32)
  ragged = engine_lib._ragged(rows, page, cap=64)  # pylint: disable=protected-access
  assert len(ragged['pages']) == 16 > sum(map(len, rows))  # 13 pages, padded to the bucket
  out, lse = Attend('xla', None).ragged(q, k_layer, v_layer, ragged['pages'], ragged['page_row'],
                                        ragged['page_start'], jnp.asarray(lengths))
  width = max(map(len, rows))
  table = engine_lib._table(rows, width)  # pylint: disable=protected-access
  k, v = (x[table].reshape(len(rows), width * page, kv_heads, d) for x in (k_layer, v_layer))
  ref_out, ref_lse = decode_attention_reference(q, k, v, jnp.asarray(lengths))
  np.testing.assert_allclose(out[1:], ref_out[1:], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(lse[1:], ref_lse[1:], rtol=1e-5, atol=1e-5)
  assert np.all(np.isneginf(np.asarray(lse[0])))
