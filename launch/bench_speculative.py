"""`launch.bench --suite=speculative`: the engine with and without a draft model, same run, same target weights,
same requests, warm (an untimed pass per variant first), alternating pass by pass.

  python -m launch.bench --suite=speculative --config=configs/lm_tiny.py --workdir=/tmp/target \
      --draft_config=configs/lm_tiny_draft.py --draft_workdir=/tmp/draft

Requests: prompts cut from the embedded corpus (the standard library's sources, what the pair trained on), greedy and sampled (temperature 0.8),
ignore_eos so each runs to its cap, at several batch sizes (slots = requests). Prints tokens/s on vs off, the
ratio, the draft's acceptance rate and tokens per target pass, and checks as it goes that greedy output with
speculation equals greedy output without. Writes OUT/runs.csv, OUT/summary.md / .json, OUT/bench.png and
OUT/command.txt.
"""
from __future__ import annotations

import csv
import os
import statistics
import time

import numpy as np

from launch import study_io

BATCHES = (1, 8, 32)
QUICK_BATCHES = (1, 4)


def _prompts(n: int, length: int, seed: int) -> list[str]:
  from framework import corpus  # pylint: disable=g-import-not-at-top
  files = corpus.embedded_files()  # the standard library's Python sources, what the pair trained on
  rng = np.random.default_rng(seed)
  text = ''
  for i in rng.choice(len(files), size=20, replace=False):
    with open(files[i][1], encoding='utf-8', errors='replace') as f:
      text += f.read(20_000)
  starts = rng.integers(0, len(text) - length, n)
  return [text[s:s + length] for s in starts]


def run(cfg, workdir: str, draft_cfg, draft_workdir: str, quick: bool, passes: int, out: str,
        command: str) -> list[dict]:
  import jax  # pylint: disable=g-import-not-at-top
  from framework.inference import loading  # pylint: disable=g-import-not-at-top
  from framework.inference.engine import Engine, serving_sharder  # pylint: disable=g-import-not-at-top
  from framework.inference.requests import Request  # pylint: disable=g-import-not-at-top
  from framework.inference.sampling import SamplingParams  # pylint: disable=g-import-not-at-top
  if passes < 1:
    raise ValueError(f'--passes: {passes} must be >= 1')
  sharder = serving_sharder(cfg)
  params = loading.params_from_workdir(cfg, workdir, sharder)
  draft = loading.draft_from_workdir((draft_cfg, draft_workdir), sharder)
  max_tokens = 16 if quick else 64
  rows = []
  for batch in (QUICK_BATCHES if quick else BATCHES):
    for temperature in (0.0, 0.8):
      prompts = _prompts(batch, 32, seed=batch)
      requests = [Request(prompt=p, sampling=SamplingParams(max_tokens=max_tokens, temperature=temperature,
                                                            seed=i, ignore_eos=True)) for i, p in enumerate(prompts)]
      icfg = cfg.copy_and_resolve_references()
      icfg.inference.update(slots=batch, prefill_rows=min(batch, 4))
      runs = {'off': [], 'on': []}
      for i in range(passes + 1):
        for variant in runs:
          engine = Engine(icfg, params, sharder=sharder, draft=draft if variant == 'on' else None)
          start = time.perf_counter()
          results = engine.generate(requests)
          wall = time.perf_counter() - start
          if i:
            runs[variant].append((wall, results, engine.kv_stats()))
      if temperature == 0:
        off, on = runs['off'][0][1], runs['on'][0][1]
        if [r.tokens for r in off] != [r.tokens for r in on]:
          raise RuntimeError(f'batch {batch}: greedy output with speculation differs from without; a bug')
      tps = {v: statistics.median(sum(len(r.tokens) for r in res) / wall for wall, res, _ in runs[v]) for v in runs}
      stats = runs['on'][-1][2]
      rows.append(dict(batch=batch, temperature=temperature, k=cfg.inference.speculative_tokens,
                       tokens_off_per_s=tps['off'], tokens_on_per_s=tps['on'], speedup=tps['on'] / tps['off'],
                       acceptance_rate=stats['acceptance_rate'],
                       tokens_per_target_pass=stats['tokens_per_target_pass'], passes=passes))
  _write(rows, out, command, jax.devices()[0].device_kind, jax.default_backend())
  return rows


def _write(rows, out: str, command: str, device: str, backend: str) -> None:
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, 'runs.csv'), 'w', newline='', encoding='utf-8') as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  lines = [f'# Speculative decoding ({device}, {backend})', '',
           f'Median of {rows[0]["passes"]} alternating passes, warm; k = {rows[0]["k"]} draft tokens per round. '
           f'Made by `{command}`. Greedy outputs with and without speculation were checked equal.', '',
           '| batch | temperature | tokens/s off | tokens/s on | on / off | acceptance | tokens per target pass |',
           '|---|---|---|---|---|---|---|']
  for r in rows:
    lines.append(f'| {r["batch"]} | {r["temperature"]} | {r["tokens_off_per_s"]:.0f} | {r["tokens_on_per_s"]:.0f} | '
                 f'{r["speedup"]:.2f}x | {r["acceptance_rate"]:.0%} | {r["tokens_per_target_pass"]:.2f} |')
  study_io.write_summary(out, lines, rows, command)
  _plot(rows, os.path.join(out, 'bench.png'))
  print('\n'.join(lines))


def _plot(rows, path: str) -> None:
  fig, (a, b) = study_io.subplots(1, 2, figsize=(9, 3.6))
  for temperature, style in ((0.0, '-o'), (0.8, '--s')):
    sel = [r for r in rows if r['temperature'] == temperature]
    a.plot([r['batch'] for r in sel], [r['speedup'] for r in sel], style, label=f'temperature {temperature}')
    b.plot([r['batch'] for r in sel], [r['acceptance_rate'] for r in sel], style, label=f'temperature {temperature}')
  a.axhline(1.0, color='gray', lw=0.8)
  a.set_xscale('log', base=2)
  a.set_xlabel('batch (sequences)')
  a.set_ylabel('tokens/s, speculative / plain')
  b.set_xscale('log', base=2)
  b.set_xlabel('batch (sequences)')
  b.set_ylabel('draft acceptance rate')
  a.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
