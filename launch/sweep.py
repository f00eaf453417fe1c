"""Batch-size sweep: steps and examples to a target loss per batch size, the critical batch size, and B_simple.

  python -m launch.sweep --config=configs/lm_tiny.py --workdir=DIR --target_loss=2.2 \
      [--batch_sizes=4,8,16,32,64,128 --lr_factors=0.5,1,2 --max_examples=65536] [--out=results/sweep]
  python -m launch.sweep ... --write_slurm=sweep.sbatch   # one array job per point, then --summarize_only

Each point is one batch size and one learning rate: the config's LR carried from its reference batch size
(scaling.reference_batch_size, or the config's train.batch_size when that is 0) by the `scaling` rules, times a
factor of the grid. A point trains with a constant LR after a warmup of --warmup_examples and evaluates every
--eval_examples examples on the same --eval_set held-out sequences, until the held-out loss reaches the target
(train.target_eval_loss) or --max_examples are spent; steps and examples to the target are interpolated between
the two evaluations around it. Every point also runs the noise-scale estimate (two micro-batches), so B_simple is
measured along the way. The best LR per batch size gives S(B) and E(B) = S(B) B, fitted with
(S/S_min - 1)(E/E_min - 1) = 1 (framework/critical_batch.py).

Each point has its own workdir (DIR/b{B}_lr{factor}) and writes result.json when it ends: reached, not reached
within the budget, or diverged. An interrupted sweep rerun with the same flags skips finished points and resumes
the one in progress from its checkpoint. Writes to --out: points.csv, summary.json, summary.md,
steps_vs_examples.png, steps_vs_batch.png, b_simple.png and command.txt.
"""
from __future__ import annotations

import csv
import json
import math
import os
import shlex
import sys

import numpy as np
from absl import app, flags, logging

from framework import critical_batch
from framework import metrics as metrics_lib
from launch import runtime_flags, study_io

MICRO_BATCHES = 2  # the noise-scale estimate compares the two micro-batch gradients with the step's


def point_name(batch_size: int, factor: float) -> str:
  return f'b{batch_size}_lr{factor:g}'


def point_config(base, batch_size: int, factor: float, *, target_loss: float, max_examples: int,
                 warmup_examples: int, eval_examples: int, eval_set: int):
  """The config of one sweep point (see the module docstring)."""
  if batch_size % MICRO_BATCHES or eval_set % batch_size:
    raise ValueError(f'--batch_sizes: {batch_size} must be even (two micro-batches) and divide --eval_set={eval_set}')
  cfg = base.copy_and_resolve_references()
  reference = cfg.scaling.reference_batch_size or cfg.train.batch_size
  cfg.scaling.reference_batch_size = reference
  cfg.optim.update(lr=cfg.optim.lr * factor, schedule='constant', warmup_steps=math.ceil(warmup_examples / batch_size))
  cfg.train.update(batch_size=batch_size, micro_batches=MICRO_BATCHES, steps=math.ceil(max_examples / batch_size),
                   eval_every=max(1, round(eval_examples / batch_size)), eval_batches=eval_set // batch_size,
                   log_every=max(1, round(eval_examples / batch_size / 4)), target_eval_loss=target_loss)
  cfg.batch_schedule.mode = 'fixed'
  cfg.noise_scale.enabled = True
  cfg.checkpoint.update(enabled=True, every_steps=max(1, round(8 * eval_examples / batch_size)), keep_last=1)
  return cfg


def point_result(workdir: str, target: float, seq_len: int, logged: bool = True) -> dict:
  """Steps and examples to the target (interpolated), and the noise scale, from a finished point's records
  (none if not `logged`)."""
  records = metrics_lib.read_records(workdir) if logged else []
  evals = [r for r in records if 'eval_loss' in r]
  steps = critical_batch.crossing([r['step'] for r in evals], [r['eval_loss'] for r in evals], target)
  examples = critical_batch.crossing([r['examples'] for r in evals], [r['eval_loss'] for r in evals], target)
  noise = [(r['examples'], r['loss'], float(r['b_simple']) / seq_len) for r in records if 'b_simple' in r]
  at_target = [b for e, _, b in noise if examples is not None and e <= examples]
  return {'reached': steps is not None, 'steps': steps, 'examples': examples,
          'final_eval_loss': evals[-1]['eval_loss'] if evals else None,
          'b_simple_at_target': float(np.median(at_target[-4:])) if at_target else None,
          'noise': noise, 'evals': [(r['step'], r['examples'], r['eval_loss']) for r in evals]}


def run_point(cfg, workdir: str, target: float, devices=None) -> dict:
  """Trains one point (resuming it if it was interrupted) and writes its result.json; a finished point is read."""
  from framework import loop  # pylint: disable=g-import-not-at-top  (after the device flags take effect)
  path = os.path.join(workdir, 'result.json')
  if os.path.exists(path):
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  try:
    loop.train(cfg, workdir, devices=devices)
    result = {'diverged': False, **point_result(workdir, target, cfg.data.seq_len)}
  except loop.NonFiniteLossError as e:
    logging.warning('%s diverged: %s', workdir, e)
    # Same fields as a finished point's; the records up to the divergence (evals, noise scale) are kept.
    logged = os.path.exists(os.path.join(workdir, 'metrics.jsonl'))  # not if it diverged before its first log
    result = {**point_result(workdir, target, cfg.data.seq_len, logged), 'diverged': True, 'reached': False,
              'steps': None, 'examples': None, 'b_simple_at_target': None}
  with open(os.path.join(workdir, 'config.json'), encoding='utf-8') as f:  # the LR after the scaling rules
    result.update(batch_size=cfg.train.batch_size, lr=json.load(f)['optim']['lr'])
  with open(path + '.tmp', 'w', encoding='utf-8') as f:
    json.dump(result, f)
  os.replace(path + '.tmp', path)
  return result


def summarise(points: list[dict], target: float, seq_len: int) -> dict:
  """Best LR per batch size, the hyperbola fit, the 20% critical batch size and the measured B_simple."""
  best = {}
  for p in points:
    if p['reached'] and (p['batch_size'] not in best or p['steps'] < best[p['batch_size']]['steps']):
      best[p['batch_size']] = p
  sizes = sorted(best)
  steps = [best[b]['steps'] for b in sizes]
  summary = {'target_loss': target, 'seq_len': seq_len, 'points': len(points),
             'reached': sum(p['reached'] for p in points), 'diverged': sum(p.get('diverged', False) for p in points),
             'best': [{'batch_size': b, 'factor': best[b]['factor'], 'lr': best[b]['lr'], 'steps': best[b]['steps'],
                       'examples': best[b]['examples'], 'b_simple_at_target': best[b]['b_simple_at_target']}
                      for b in sizes]}
  if len(sizes) >= 3:
    fit = critical_batch.fit_hyperbola(sizes, steps)
    summary['fit'] = {'s_min': fit.s_min, 'e_min': fit.e_min, 'b_crit': fit.b_crit,
                      'rms_log_error': fit.rms_log_error}
  if len(sizes) >= 2:
    summary['cbs_20pct'] = critical_batch.linear_scaling_cbs(sizes, steps)
  measured = [best[b]['b_simple_at_target'] for b in sizes if best[b]['b_simple_at_target'] is not None]
  summary['b_simple_at_target_median'] = float(np.median(measured)) if measured else None
  return summary


CSV_COLUMNS = ('batch_size', 'factor', 'lr', 'reached', 'diverged', 'steps', 'examples', 'final_eval_loss',
               'b_simple_at_target')


def write_outputs(points: list[dict], summary: dict, out: str, command: str) -> None:
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, 'points.csv'), 'w', newline='', encoding='utf-8') as f:
    w = csv.writer(f)
    w.writerow(CSV_COLUMNS)
    for p in points:
      w.writerow([p.get(c) for c in CSV_COLUMNS])
  fit = summary.get('fit')
  lines = [f"Target held-out loss {summary['target_loss']}; {summary['reached']} of {summary['points']} points "
           f"reached it, {summary['diverged']} diverged.", '',
           '| batch | best LR | steps to target | examples to target | B_simple at target (seqs) |',
           '|---|---|---|---|---|']
  for b in summary['best']:
    noise = f"{b['b_simple_at_target']:.1f}" if b['b_simple_at_target'] is not None else 'n/a'
    lines.append(f"| {b['batch_size']} | {b['lr']:.3g} (x{b['factor']:g}) | {b['steps']:.1f} | {b['examples']:.0f} | "
                 f'{noise} |')
  if fit:
    lines += ['', f"Fit (S/S_min - 1)(E/E_min - 1) = 1: S_min = {fit['s_min']:.1f} steps, E_min = {fit['e_min']:.0f} "
              f"examples, B_crit = E_min/S_min = {fit['b_crit']:.1f} sequences; rms error of log S "
              f"{fit['rms_log_error']:.3f}."]
  cbs = summary.get('cbs_20pct')
  lines.append(f"20% over linear scaling: {f'{cbs:.1f} sequences' if cbs else 'not reached in the sweep'}. "
               f"Median B_simple at the target: {summary['b_simple_at_target_median']}")
  study_io.write_summary(out, lines, summary, command)
  from launch import sweep_plots  # pylint: disable=g-import-not-at-top  (matplotlib: the [study] extra)
  sweep_plots.write(points, summary, out)


def sweep(base, workdir: str, out: str, *, batch_sizes, lr_factors, target_loss: float, max_examples: int,
          warmup_examples: int, eval_examples: int, eval_set: int, only_point: int = -1,
          summarize_only: bool = False, command: str = '', devices=None) -> dict | None:
  """Runs (or, with only_point, one of) the sweep's points on `devices` (default: all), then writes the outputs.
  Returns the summary (None with only_point)."""
  if target_loss <= 0:
    raise ValueError(f'--target_loss must be > 0 (a held-out loss every point should reach), got {target_loss}')
  grid = [(int(b), float(f)) for b in batch_sizes for f in lr_factors]
  if not -1 <= only_point < len(grid):
    raise ValueError(f'--point={only_point}: the sweep has points 0..{len(grid) - 1}')
  configs = {(b, f): point_config(base, b, f, target_loss=target_loss, max_examples=max_examples,
                                  warmup_examples=warmup_examples, eval_examples=eval_examples, eval_set=eval_set)
             for b, f in grid}  # every point's config is checked before the first one trains
  points = []
  for i, (b, f) in enumerate(grid):
    point_dir = os.path.join(workdir, point_name(b, f))
    if only_point >= 0 and i != only_point:
      continue
    if summarize_only:
      path = os.path.join(point_dir, 'result.json')
      if not os.path.exists(path):
        logging.warning('point %s has no result yet: left out of the summary', point_name(b, f))
        continue
      with open(path, encoding='utf-8') as fh:
        result = json.load(fh)
    else:
      logging.info('point %d/%d: batch %d, LR factor %g', i + 1, len(grid), b, f)
      result = run_point(configs[(b, f)], point_dir, target_loss, devices)
    points.append({**result, 'factor': f})
  if only_point >= 0:
    return None
  summary = summarise(points, target_loss, base.data.seq_len)
  write_outputs(points, summary, out, command)
  return summary


def slurm_script(argv: list[str], points: int, workdir: str) -> str:
  """An sbatch array script running one point per task with the same flags (then summarise once)."""
  flags_ = ' '.join(shlex.quote(a) for a in argv if not a.startswith('--write_slurm'))
  return f"""#!/bin/bash
#SBATCH --job-name=batchax-sweep
#SBATCH --array=0-{points - 1}
#SBATCH --output={workdir}/slurm-%A_%a.out
#SBATCH --cpus-per-task=4
# One task per sweep point (each resumes from its own checkpoint if requeued). When all are done:
#   python -m launch.sweep {flags_} --summarize_only
set -euo pipefail
python -m launch.sweep {flags_} --point="$SLURM_ARRAY_TASK_ID"
"""


def define_flags() -> None:
  """Defined only when run as a script (absl flags are process-wide; other launchers define --config too)."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file('config', None, 'Config file the points start from.', lock_config=False)
  flags.DEFINE_string('workdir', None, 'Directory for the points (one subdirectory each).')
  flags.DEFINE_string('out', 'results/sweep', 'Where the table and plots go.')
  flags.DEFINE_list('batch_sizes', ['4', '8', '16', '32', '64', '128'], 'Global batch sizes (sequences).')
  flags.DEFINE_list('lr_factors', ['0.5', '1', '2'], 'LR grid: factors on the rule-scaled LR.')
  flags.DEFINE_float('target_loss', 0.0, 'The held-out loss each point trains to.')
  flags.DEFINE_integer('max_examples', 65536, 'Budget per point; a point that spends it is "not reached".')
  flags.DEFINE_integer('warmup_examples', 1024, 'Linear LR warmup, in examples (the same for every batch size).')
  flags.DEFINE_integer('eval_examples', 512, 'Examples between evaluations.')
  flags.DEFINE_integer('eval_set', 256, 'Held-out sequences per evaluation (the same ones for every point).')
  flags.DEFINE_integer('point', -1, 'Run only this point (an index into batch_sizes x lr_factors), e.g. a SLURM '
                       'array task; -1: all.')
  flags.DEFINE_bool('summarize_only', False, 'Only read the finished points and write the outputs.')
  flags.DEFINE_string('write_slurm', '', 'Write an sbatch array script (one task per point) here and exit.')
  flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  if f.write_slurm:
    with open(f.write_slurm, 'w', encoding='utf-8') as fh:
      fh.write(slurm_script(sys.argv[1:], len(f.batch_sizes) * len(f.lr_factors), f.workdir))
    logging.info('wrote %s: sbatch it, then rerun with --summarize_only', f.write_slurm)
    return
  runtime_flags.exit_on_user_error(runtime_flags.apply)
  summary = runtime_flags.exit_on_user_error(
      sweep, f.config, f.workdir, f.out, batch_sizes=f.batch_sizes, lr_factors=[float(x) for x in f.lr_factors],
      target_loss=f.target_loss, max_examples=f.max_examples, warmup_examples=f.warmup_examples,
      eval_examples=f.eval_examples, eval_set=f.eval_set, only_point=f.point, summarize_only=f.summarize_only,
      command='python -m launch.sweep ' + ' '.join(shlex.quote(a) for a in sys.argv[1:]))
  if summary is not None:
    with open(os.path.join(f.out, 'summary.md'), encoding='utf-8') as fh:
      print(fh.read())


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=runtime_flags.parse_flags)
