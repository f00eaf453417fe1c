"""Batch speculative decoding (framework/inference/speculative.py): greedy output equal to non-speculative output
for 1 to 32 sequences with ragged acceptance, caps and stops mid-round; the accept/reject rule keeps the target's
distribution (against the distribution computed in the test); the draft/target pair is checked."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from framework.inference import speculative
from framework.inference.engine import Engine, serving_sharder
from framework.inference.requests import Request
from framework.inference.sampling import SamplingParams
from framework.mesh import make_sharder
from framework.train import Trainer
from serving_setup import small_cfg

_CACHE = {}


def target_and_drafts():
  """Target params; a noisy copy of them (high, ragged acceptance); a smaller unrelated draft (low acceptance)."""
  if not _CACHE:
    cfg = small_cfg()
    one = jax.devices()[:1]
    params = jax.device_get(Trainer(cfg, make_sharder(cfg, one)).init(jax.random.key(5)).params)
    leaves, tree = jax.tree.flatten(params)
    rng = np.random.default_rng(0)
    noisy = jax.tree.unflatten(tree, [x + 0.1 * np.std(x) * rng.standard_normal(x.shape).astype(x.dtype)
                                      if x.ndim > 1 else x for x in leaves])
    small = small_cfg()
    small.model.update(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64)
    small_params = jax.device_get(Trainer(small, make_sharder(small, one)).init(jax.random.key(6)).params)
    _CACHE.update(cfg=cfg, params=params, noisy=(cfg, noisy), small=(small, small_params))
  return _CACHE


def engine(slots, draft=None, k=4):
  c = target_and_drafts()
  cfg = c['cfg'].copy_and_resolve_references()
  cfg.inference.update(slots=slots, speculative_tokens=k)
  return Engine(cfg, c['params'], sharder=serving_sharder(cfg, jax.devices()[:1]), draft=draft)


def workload(n, order=0, **sampling):
  rng = np.random.default_rng(order)
  out = []
  for i in range(n):
    prompt = [1] + rng.integers(3, 259, size=int(rng.integers(1, 40))).tolist()
    out.append(Request(tokens=prompt, sampling=SamplingParams(max_tokens=int(rng.integers(1, 40)), ignore_eos=True,
                                                              **sampling)))
  return out


@pytest.mark.parametrize('requests, slots, draft', [
    (1, 1, 'noisy'), (5, 4, 'noisy'), pytest.param(32, 32, 'noisy', marks=pytest.mark.slow), (12, 8, 'small'),
], ids=['batch1', 'batch4', 'batch32', 'small_draft'])
def test_greedy_equals_non_speculative(requests, slots, draft):
  reqs = workload(requests)
  want = engine(slots).generate(reqs)
  spec = engine(slots, draft=target_and_drafts()[draft])
  got = spec.generate(reqs)
  for g, w in zip(got, want):
    assert g.tokens == w.tokens and g.finish_reason == w.finish_reason
    np.testing.assert_allclose(g.logprobs or [], w.logprobs or [], atol=1e-4)
  stats = spec.kv_stats()
  assert stats['speculative_rounds'] > 0 and stats['tokens_per_target_pass'] >= 1.0
  if draft == 'noisy':  # ragged: some drafts accepted, some not (the unrelated small draft: almost none)
    assert 0.2 < stats['acceptance_rate'] < 0.98 and stats['tokens_per_target_pass'] > 1.5, stats
  assert spec.pool.used == 0  # lookahead pages go back too


def test_greedy_equal_for_an_moe_target_under_a_small_pool():
  """Every-layer MoE target, its noisy copy as the draft, 15 usable pages for 4 slots: lookahead pages compete
  with admission and preemption recomputes sequences mid-run."""
  cfg = small_cfg()
  cfg.moe.update(num_experts=4, top_k=2, d_ff_expert=64, every=1)
  cfg.inference.update(kv_pages=16)
  one = jax.devices()[:1]
  params = jax.device_get(Trainer(cfg, make_sharder(cfg, one)).init(jax.random.key(8)).params)
  rng = np.random.default_rng(1)
  noisy = jax.tree.map(lambda x: x + 0.1 * np.std(x) * rng.standard_normal(x.shape).astype(x.dtype)
                       if x.ndim > 1 else x, params)
  reqs = workload(10, order=4)
  want = Engine(cfg, params, sharder=serving_sharder(cfg, one)).generate(reqs)
  spec = Engine(cfg, params, sharder=serving_sharder(cfg, one), draft=(cfg, noisy))
  got = spec.generate(reqs)
  assert [g.tokens for g in got] == [w.tokens for w in want]
  stats = spec.kv_stats()
  assert stats['preemptions'] > 0 and stats['acceptance_rate'] > 0.2, stats
  assert spec.pool.used == 0


def test_stops_and_eos_inside_a_round_match():
  reqs = [Request(prompt='hello there', sampling=SamplingParams(max_tokens=30, stop=(s,)))
          for s in ('\x00', 'e', 'zz')] + workload(4, order=3)
  want = engine(4).generate(reqs)
  got = engine(4, draft=target_and_drafts()['noisy']).generate(reqs)
  assert [(g.tokens, g.text, g.finish_reason) for g in got] == [(w.tokens, w.text, w.finish_reason) for w in want]


def test_sampled_output_is_reproducible_and_well_formed():
  reqs = workload(6, order=1, temperature=0.9, top_k=50, top_p=0.95, seed=7)
  a = engine(4, draft=target_and_drafts()['noisy']).generate(reqs)
  b = engine(4, draft=target_and_drafts()['noisy']).generate(reqs)
  assert [r.tokens for r in a] == [r.tokens for r in b]
  assert [len(r.tokens) for r in a] == [min(q.sampling.max_tokens, 64 - len(q.tokens)) for q in reqs]


@pytest.mark.parametrize('temperature, top_k, top_p', [(1.0, 0, 1.0), (0.7, 5, 0.8)])
def test_accept_rule_keeps_the_target_distribution(temperature, top_k, top_p):
  rows, k, vocab = 200_000, 3, 8
  rng = np.random.default_rng(0)
  target = jnp.asarray(np.broadcast_to(rng.normal(size=(1, k + 1, vocab)) * 1.5, (rows, k + 1, vocab)), jnp.float32)
  draft_logits = jnp.asarray(rng.normal(size=(k, vocab)) * 1.5, jnp.float32)
  smp = dict(temperature=jnp.full(rows, temperature, jnp.float32), top_k=jnp.full(rows, top_k, jnp.int32),
             top_p=jnp.full(rows, top_p, jnp.float32), seeds=jnp.arange(rows, dtype=jnp.uint32),
             counters=jnp.zeros(rows, jnp.int32))
  drafts, logqs = [], []
  for i in range(k):
    tok, logq = speculative.draft_sample(jnp.broadcast_to(draft_logits[i], (rows, vocab)),
                                         dict(smp, counters=smp['counters'] + i))
    drafts.append(tok)
    logqs.append(logq)
  accepted, tokens, _ = jax.jit(speculative.accept)(target, jnp.stack(drafts, 1), jnp.stack(logqs, 1),
                                                    jnp.full(rows, k, jnp.int32), smp)
  tokens, acc = np.asarray(tokens), np.asarray(accepted)
  # The first token follows the target's distribution at position 0; given that d_1 was accepted, the second
  # follows its distribution at position 1 (whether it is d_2 accepted or the residual's sample).
  for position, rows_ in ((0, slice(None)), (1, acc >= 1)):
    want = filtered_distribution(np.asarray(target[0, position], np.float64), temperature, top_k, top_p)
    got = np.bincount(tokens[rows_, position], minlength=vocab) / len(tokens[rows_])
    assert 0.5 * np.abs(got - want).sum() < 0.01, (position, got, want)
  assert 0 < (acc == 0).mean() < 1 and (acc >= 1).sum() > 20_000  # some rejected at once, many accepted


def filtered_distribution(logits, temperature, top_k, top_p):
  """Temperature, then the top_k most likely, then the smallest most-likely set whose mass reaches top_p."""
  z = logits / temperature
  order = np.argsort(-z)
  p = np.exp(z[order] - z.max())
  if top_k:
    p[top_k:] = 0
  p /= p.sum()
  p = np.where((np.cumsum(p) - p) < top_p, p, 0)
  out = np.zeros(len(logits))
  out[order] = p / p.sum()
  return out


def test_a_draft_must_share_the_vocabulary():
  c = target_and_drafts()
  other = c['cfg'].copy_and_resolve_references()
  other.model.vocab_size = 300
  with pytest.raises(ValueError, match='draft model.vocab_size: 300'):
    speculative.check_pair(c['cfg'], other)


@pytest.mark.slow
def test_bench_suite_with_the_target_as_its_own_draft(tmp_path):
  """`launch.bench --suite=speculative --quick` end to end; a draft equal to the target accepts every token."""
  from framework.inference.speculative import draft_config
  from launch import bench_speculative
  from serving_setup import save_run
  workdir = tmp_path / 'run'
  workdir.mkdir()
  save_run(workdir)
  cfg = small_cfg()
  draft = draft_config(cfg, small_cfg(), len(jax.devices()), 'cpu')
  rows = bench_speculative.run(cfg, str(workdir), draft, str(workdir), quick=True, passes=1, out=str(tmp_path / 'out'),
                               command='test')
  assert [(r['batch'], r['temperature']) for r in rows] == [(1, 0.0), (1, 0.8), (4, 0.0), (4, 0.8)]
  # 16 tokens: the first from a decode step's round, then 5 a round (4 drafts + 1) until the cap: ~4 a pass.
  assert all(r['acceptance_rate'] == 1.0 and r['tokens_per_target_pass'] >= 3.5 for r in rows)
  assert (tmp_path / 'out' / 'bench.png').stat().st_size > 0
  assert len((tmp_path / 'out' / 'runs.csv').read_text().splitlines()) == 5
