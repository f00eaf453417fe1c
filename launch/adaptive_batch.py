"""Adaptive batch size against fixed small and fixed large batches, at an equal example budget.

  python -m launch.adaptive_batch --workdir=DIR [--config=configs/lm_tiny.py --sizes=8,16,32,64 --micro_rows=4
      --budget_examples=16384 --theta=0.5] [--out=results/adaptive_batch]

Three runs of the same model, data order and LR schedule in examples (warmup and cosine decay over the budget):
fixed at the ladder's smallest batch, fixed at its largest, and the norm test climbing the ladder
(batch_schedule.mode='adaptive', framework/batch_schedule.py). Every run keeps micro-batches of --micro_rows
sequences (the same per-device memory) and carries its LR, beta2 and weight decay from the config's reference
batch by the `scaling` rules; the held-out loss is measured on the same sequences every --eval_examples examples.
Wall-clock is the whole train() call, compilation included (the adaptive run compiles once per rung it reaches).

Writes to --out: runs.csv (one row per evaluation), summary.json, summary.md, loss.png (held-out loss vs examples
and vs wall-clock, batch size vs examples) and command.txt. Finished runs are read back, not retrained.
"""
from __future__ import annotations

import csv
import json
import os
import time

from absl import app, flags

from framework import metrics as metrics_lib
from launch import runtime_flags, study_io


def run_configs(base, sizes, micro_rows: int, budget: int, theta: float, eval_examples: int, eval_set: int):
  """name -> config of the three runs (see the module docstring)."""
  small, top = sizes[0], sizes[-1]
  if budget % top or eval_set % top or any(s % micro_rows for s in sizes):
    raise ValueError(f'--budget_examples={budget} and --eval_set={eval_set} must be multiples of the largest batch '
                     f'{top}, and every size a multiple of --micro_rows={micro_rows}')
  warmup_examples = base.optim.warmup_steps * base.train.batch_size  # the config's warmup, kept in examples
  reference = base.scaling.reference_batch_size or base.train.batch_size
  configs = {}
  for name, batch in (('fixed_small', small), ('fixed_large', top), ('adaptive', top)):
    cfg = base.copy_and_resolve_references()
    cfg.scaling.reference_batch_size = reference
    cfg.train.update(batch_size=batch, micro_batches=batch // micro_rows, steps=budget // batch,
                     eval_every=max(1, eval_examples // (small if name == 'adaptive' else batch)),
                     eval_batches=eval_set // batch, log_every=max(1, eval_examples // (4 * batch)))
    cfg.optim.warmup_steps = warmup_examples // batch
    cfg.noise_scale.enabled = True
    cfg.checkpoint.update(enabled=True, every_steps=10**6, keep_last=1)
    if name == 'adaptive':
      cfg.batch_schedule.update(mode='adaptive', sizes=tuple(sizes), theta=theta,
                                check_every=max(1, eval_examples // (4 * small)))
    configs[name] = cfg
  return configs


def train_runs(configs: dict, workdir: str, devices=None) -> dict:
  from framework import loop  # pylint: disable=g-import-not-at-top  (after the device flags take effect)
  runs = {}
  for name, cfg in configs.items():
    run_dir = os.path.join(workdir, name)
    timing = os.path.join(run_dir, 'wall_clock.json')
    if not os.path.exists(timing):
      start = time.perf_counter()
      loop.train(cfg, run_dir, devices=devices)
      with open(timing, 'w', encoding='utf-8') as f:
        json.dump({'seconds': time.perf_counter() - start}, f)
    with open(timing, encoding='utf-8') as f:
      seconds = json.load(f)['seconds']
    records = metrics_lib.read_records(run_dir)
    evals = [r for r in records if 'eval_loss' in r]
    runs[name] = {'wall_clock_s': seconds, 'records': records, 'evals': evals,
                  'final_eval_loss': evals[-1]['eval_loss'], 'examples': records[-1]['examples'],
                  'steps': records[-1]['step'], 'batch_sizes': sorted({r['batch_size'] for r in records})}
  return runs


def write_outputs(runs: dict, out: str, command: str) -> None:
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, 'runs.csv'), 'w', newline='', encoding='utf-8') as f:
    w = csv.writer(f)
    w.writerow(('run', 'step', 'examples', 'batch_size', 'eval_loss', 'train_loss', 'b_simple_tokens'))
    for name, r in runs.items():
      for e in r['evals']:
        w.writerow((name, e['step'], e['examples'], e['batch_size'], e['eval_loss'], e['loss'], e.get('b_simple')))
  summary = {name: {k: v for k, v in r.items() if k not in ('records', 'evals')} for name, r in runs.items()}
  lines = ['| run | batch sizes | steps | examples | final held-out loss | wall-clock (s, with compiles) |',
           '|---|---|---|---|---|---|']
  for name, r in summary.items():
    lines.append(f"| {name} | {', '.join(map(str, r['batch_sizes']))} | {r['steps']} | {r['examples']} | "
                 f"{r['final_eval_loss']:.4f} | {r['wall_clock_s']:.0f} |")
  study_io.write_summary(out, lines, summary, command)
  write_plot(runs, out)


def write_plot(runs: dict, out: str) -> None:

  fig, (ax_e, ax_t, ax_b) = study_io.subplots(1, 3, figsize=(15, 4))
  for name, r in runs.items():
    examples = [e['examples'] for e in r['evals']]
    losses = [e['eval_loss'] for e in r['evals']]
    ax_e.plot(examples, losses, 'o-', ms=3, label=name)
    ax_t.plot([e['elapsed_s'] for e in r['evals']], losses, 'o-', ms=3, label=name)
    ax_b.step([x['examples'] for x in r['records']], [x['batch_size'] for x in r['records']], where='post',
              label=name)
  ax_e.set(xlabel='examples', ylabel='held-out loss', title='held-out loss vs examples')
  ax_t.set(xlabel='wall-clock (s, compilation included)', ylabel='held-out loss', title='held-out loss vs time')
  ax_b.set(xlabel='examples', ylabel='batch size (sequences)', yscale='log', title='batch size')
  ax_e.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(out, 'loss.png'), dpi=120)


def study(config_path: str, workdir: str, out: str, sizes, micro_rows: int, budget: int, theta: float,
          eval_examples: int, eval_set: int, command: str = '', devices=None) -> dict:
  """Trains (or reads back) the three runs on `devices` (default: all) and writes the outputs."""
  sizes = sorted(int(s) for s in sizes)
  base = study_io.load_config(config_path)
  configs = run_configs(base, sizes, micro_rows, budget, theta, eval_examples, eval_set)
  runs = train_runs(configs, workdir, devices)
  write_outputs(runs, out, command)
  return runs


def define_flags() -> None:
  """Defined only when run as a script (absl flags are process-wide)."""
  flags.DEFINE_string('workdir', None, 'Directory for the three runs.')
  flags.DEFINE_string('out', 'results/adaptive_batch', 'Where the table and plots go.')
  flags.DEFINE_string('study_config', 'configs/lm_tiny.py', 'The config file the runs start from.')
  flags.DEFINE_list('sizes', ['8', '16', '32', '64'], 'The batch ladder (sequences); fixed runs use its ends.')
  flags.DEFINE_integer('micro_rows', 4, 'Sequences per micro-batch, in every run.')
  flags.DEFINE_integer('budget_examples', 16384, 'Examples every run trains on.')
  flags.DEFINE_float('theta', 0.5, "The norm test's tolerance.")
  flags.DEFINE_integer('eval_examples', 1024, 'Examples between evaluations (at the smallest batch).')
  flags.DEFINE_integer('eval_set', 256, 'Held-out sequences per evaluation.')
  flags.mark_flags_as_required(['workdir'])


def main(argv):
  f = flags.FLAGS
  study_io.run_main(argv, 'launch.adaptive_batch', study, f.study_config, f.workdir, f.out, f.sizes, f.micro_rows,
                    f.budget_examples, f.theta, f.eval_examples, f.eval_set, out=f.out)


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=runtime_flags.parse_flags)
