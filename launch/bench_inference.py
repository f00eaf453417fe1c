"""`launch.bench --suite=inference`: the engine's scheduling choices against their baselines, same run, same
model and requests, warm (every step shape compiled by a first pass that is not timed), the variants alternating
pass by pass so a change in machine load hits both.

1. Continuous vs static batching on a heavy-tailed output-length workload: static admits a new batch only when
   the whole last one has finished (the slots of the finished sequences idle meanwhile). Tokens/s and engine
   steps, for an offline batch of 96 requests (which ends with one long request decoding alone, a drain that
   both pay) and of 256 (the drain a smaller part, nearer a server's steady state).
2. Prefix sharing on vs off: B requests with one long common prefix and their own short suffixes. With sharing
   the prefix's KV pages are computed once and stored once, and decodes read them once per step per group
   (shared-prefix attention); without it every request prefills and stores its own copy. Tokens/s (generated
   tokens over the whole run, prefill included), KV pages at peak.
3. Chunked vs unchunked prefill: requests decoding while long prompts arrive. Unchunked, a long prompt's whole
   prefill rides in one step and every decode waits for it; chunked, it advances inference.prefill_chunk tokens a
   step. The worst and p99 time between tokens of the decoding requests, and tokens/s.

Random weights (timings do not depend on them); ignore_eos so every request runs to its cap. Writes
OUT/runs.csv, OUT/summary.md / .json, OUT/bench.png and OUT/command.txt.
"""
from __future__ import annotations

import csv
import os
import statistics
import time

import numpy as np

from launch import study_io

MODEL = dict(vocab_size=512, d_model=256, n_layers=4, n_heads=8, n_kv_heads=2, d_ff=768)
# (prefix, batch, suffix, output tokens) for the prefix-sharing comparison.
PREFIX_CASES = ((1024, 16, 16, 16), (2048, 32, 16, 16))
QUICK_PREFIX_CASES = ((256, 8, 8, 8),)


def _cfg(max_seq_len: int, **inference):
  from framework import config as config_lib  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  cfg = config_lib.defaults()
  cfg.model.update(max_seq_len=max_seq_len, **MODEL)
  cfg.data.seq_len = min(cfg.data.seq_len, max_seq_len)
  cfg.inference.update(**inference)
  config_lib.validate(cfg, num_devices=1, backend=jax.default_backend())
  return cfg


class _Bench:
  """Engines over one set of random weights, placed once."""

  def __init__(self, max_seq_len: int):
    import jax  # pylint: disable=g-import-not-at-top
    from framework.inference.engine import serving_sharder  # pylint: disable=g-import-not-at-top
    from framework.train import Trainer  # pylint: disable=g-import-not-at-top
    self.max_seq_len = max_seq_len
    cfg = _cfg(max_seq_len)
    self.sharder = serving_sharder(cfg, jax.devices()[:1])
    self.params = Trainer(cfg, self.sharder).init(jax.random.key(0)).params

  def engine(self, **inference):
    from framework.inference.engine import Engine  # pylint: disable=g-import-not-at-top
    return Engine(_cfg(self.max_seq_len, **inference), self.params, sharder=self.sharder)

  def compare(self, variants: dict, requests, passes: int) -> dict:
    """{name: [(wall seconds, results, kv_stats)] per timed pass}; an untimed pass per variant first."""
    runs = {name: [] for name in variants}
    for i in range(passes + 1):
      for name, inference in variants.items():
        engine = self.engine(**inference)
        start = time.perf_counter()
        results = engine.generate(requests)
        wall = time.perf_counter() - start
        if i:
          runs[name].append((wall, results, dict(engine.kv_stats(), steps=engine.steps)))
    return runs


def _requests(prompts, max_tokens):
  from framework.inference.requests import Request  # pylint: disable=g-import-not-at-top
  from framework.inference.sampling import SamplingParams  # pylint: disable=g-import-not-at-top
  return [Request(tokens=p, id=str(i), sampling=SamplingParams(max_tokens=int(m), ignore_eos=True))
          for i, (p, m) in enumerate(zip(prompts, max_tokens))]


def _tokens_per_s(runs) -> float:
  return statistics.median(sum(len(r.tokens) for r in results) / wall for wall, results, _ in runs)


def continuous_vs_static(bench: _Bench, n: int, slots: int, passes: int) -> list[dict]:
  rng = np.random.default_rng(0)
  prompts = [rng.integers(3, 259, int(rng.integers(16, 64))).tolist() for _ in range(n)]
  # Heavy-tailed outputs: most requests stop early, a few run long (Pareto, capped by the context).
  caps = np.minimum(8 + (rng.pareto(1.2, n) * 24).astype(int), bench.max_seq_len - 64)
  common = dict(slots=slots, prefill_rows=2, prefill_chunk=64, group_offline_batch=False, prefix_sharing=False)
  runs = bench.compare({'static': dict(common, scheduling='static'), 'continuous': common},
                       _requests(prompts, caps), passes)
  static, cont = _tokens_per_s(runs['static']), _tokens_per_s(runs['continuous'])
  case = f'{n} requests, {slots} slots, outputs {int(np.median(caps))} median / {int(caps.max())} max'
  return [dict(comparison='continuous vs static', case=case, variant=v, tokens_per_s=t, baseline='static',
               vs_baseline=t / static, kv_peak_pages=statistics.median(s['kv_pages_peak'] for *_, s in runs[v]),
               steps=statistics.median(s['steps'] for *_, s in runs[v]), tbt_max_ms='', tbt_p99_ms='')
          for v, t in (('static', static), ('continuous', cont))]


def prefix_sharing(bench: _Bench, cases, passes: int) -> list[dict]:
  rows = []
  for prefix_len, batch, suffix, out in cases:
    rng = np.random.default_rng(1)
    prefix = rng.integers(3, 259, prefix_len).tolist()
    prompts = [prefix + rng.integers(3, 259, suffix).tolist() for _ in range(batch)]
    common = dict(slots=batch, prefill_rows=4, prefill_chunk=256, page_size=16)
    runs = bench.compare({'off': dict(common, prefix_sharing=False), 'on': dict(common, prefix_sharing=True)},
                         _requests(prompts, [out] * batch), passes)
    off = _tokens_per_s(runs['off'])
    case = f'prefix {prefix_len}, batch {batch}, suffix {suffix}, {out} new tokens'
    for variant in ('off', 'on'):
      stats = runs[variant][0][2]
      rows.append(dict(comparison='prefix sharing', case=case, variant=variant, tokens_per_s=_tokens_per_s(
          runs[variant]), baseline='off', vs_baseline=_tokens_per_s(runs[variant]) / off,
          kv_peak_pages=stats['kv_pages_peak'], kv_peak_mib=stats['kv_peak_bytes'] / 2**20,
          tbt_max_ms='', tbt_p99_ms=''))
  return rows


def chunked_prefill(bench: _Bench, long_prompt: int, chunk: int, passes: int) -> list[dict]:
  rng = np.random.default_rng(2)
  decoders, arrivals = 4, 4
  prompts = [rng.integers(3, 259, 16).tolist() for _ in range(decoders)]
  prompts += [rng.integers(3, 259, long_prompt).tolist() for _ in range(arrivals)]
  caps = [96] * decoders + [4] * arrivals
  common = dict(slots=decoders + arrivals, prefill_rows=1, group_offline_batch=False, prefix_sharing=False)
  runs = bench.compare({'unchunked': dict(common, prefill_chunk=long_prompt),
                        'chunked': dict(common, prefill_chunk=chunk)}, _requests(prompts, caps), passes)
  rows = []
  base = _tokens_per_s(runs['unchunked'])
  for variant in ('unchunked', 'chunked'):
    # The decoding requests' gaps, from their second token on (the first waits for their own prefill).
    gaps = [[g for r in results[:decoders] for g in r.time_between_tokens] for _, results, _ in runs[variant]]
    rows.append(dict(comparison='chunked prefill', case=f'{decoders} decoding + {arrivals} prompts of '
                     f'{long_prompt} tokens, chunk {chunk}', variant=variant,
                     tokens_per_s=_tokens_per_s(runs[variant]), baseline='unchunked',
                     vs_baseline=_tokens_per_s(runs[variant]) / base,
                     kv_peak_pages=runs[variant][0][2]['kv_pages_peak'],
                     tbt_max_ms=statistics.median(1e3 * max(g) for g in gaps),
                     tbt_p99_ms=statistics.median(1e3 * float(np.percentile(g, 99)) for g in gaps)))
  return rows


def run(quick: bool, passes: int, out: str, command: str) -> list[dict]:
  import jax  # pylint: disable=g-import-not-at-top
  device = jax.devices()[0].device_kind
  print(f'# inference suite: d {MODEL["d_model"]}, {MODEL["n_layers"]} layers, {MODEL["n_heads"]}/'
        f'{MODEL["n_kv_heads"]} heads, f32, random weights; {device}; median of {passes} alternating passes')
  rows = []
  bench = _Bench(512 if quick else 1024)
  # 96 requests: the batch ends in one long request decoding alone (a drain both variants pay); 256: the drain
  # is a smaller part of the run, nearer a server's steady state.
  for n in ((32,) if quick else (96, 256)):
    rows += continuous_vs_static(bench, n, 8 if quick else 16, passes)
  rows += chunked_prefill(bench, 256 if quick else 768, 64, passes)
  cases = QUICK_PREFIX_CASES if quick else PREFIX_CASES
  bench = _Bench(max(p + s + o for p, _, s, o in cases))
  rows += prefix_sharing(bench, cases, passes)
  lines = _table(rows, device, passes, command)
  print('\n'.join(lines[1:]))
  _write(rows, lines, out, command)
  return rows


def _table(rows, device, passes, command) -> list[str]:
  fmt = lambda v, f: '' if v == '' else f.format(v)
  lines = [f'# Inference engine benchmark ({device})', '',
           f'Median of {passes} alternating passes, warm. Made by `{command}`.', '',
           '| comparison | case | variant | tokens/s | vs baseline | steps | KV pages at peak | KV MiB at peak | '
           'worst TBT ms | p99 TBT ms |',
           '|---|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    lines.append(f"| {r['comparison']} | {r['case']} | {r['variant']} | {r['tokens_per_s']:.1f} | "
                 f"{r['vs_baseline']:.2f}x vs {r['baseline']} | {fmt(r.get('steps', ''), '{:.0f}')} | "
                 f"{r['kv_peak_pages']:.0f} | "
                 f"{fmt(r.get('kv_peak_mib', ''), '{:.1f}')} | "
                 f"{fmt(r['tbt_max_ms'], '{:.1f}')} | {fmt(r['tbt_p99_ms'], '{:.1f}')} |")
  return lines


def _write(rows, lines, out: str, command: str) -> None:
  os.makedirs(out, exist_ok=True)
  fields = ['comparison', 'case', 'variant', 'tokens_per_s', 'baseline', 'vs_baseline', 'steps', 'kv_peak_pages',
            'kv_peak_mib', 'tbt_max_ms', 'tbt_p99_ms']
  with open(os.path.join(out, 'runs.csv'), 'w', newline='', encoding='utf-8') as f:
    writer = csv.DictWriter(f, fields, extrasaction='ignore')
    writer.writeheader()
    writer.writerows(rows)
  study_io.write_summary(out, lines, rows, command)
  _plot(rows, os.path.join(out, 'bench.png'))


def _plot(rows, path: str) -> None:
  groups = [('continuous vs static', 'tokens_per_s', 'tokens/s'), ('prefix sharing', 'tokens_per_s', 'tokens/s'),
            ('prefix sharing', 'kv_peak_pages', 'KV pages at peak'), ('chunked prefill', 'tbt_max_ms',
                                                                       'worst time between tokens (ms)')]
  fig, axes = study_io.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.6))
  for ax, (comparison, field, label) in zip(axes, groups):
    mine = [r for r in rows if r['comparison'] == comparison]
    names = [f"{r['variant']}\n{r['case'].split(',')[0]}" for r in mine]
    ax.bar(range(len(mine)), [r[field] for r in mine], color=['#999' if r['variant'] == r['baseline'] else '#36c'
                                                               for r in mine])
    ax.set_xticks(range(len(mine)), names, fontsize=7)
    ax.set_title(f'{comparison}: {label}', fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
