"""The global-batch balance study: moe_tiny on the multi-domain corpus, balance pooled over groups of 1 ... B sequences.

  python -m launch.moe_balance --workdir=/tmp/moe_balance [--groups=1,2,4,16 --seeds=0,1 --steps=300]
      [--out=results/moe_balance]

Every run is moe_tiny with the same data order, steps, micro-batches (train.micro_batches=4 of 4 sequences) and
balance weight; only the balance group changes (moe.balance_scope='group'): 1 sequence (MaxText's per-sequence
loss), 4 = one micro-batch ('micro': what Megatron and MaxText compute with one device per micro-batch), 16 = the
whole step ('global', the running form across the 4 micro-batches). The claim under test ("Demons in the Detail",
../shared/PAPERS.md): larger balance groups give more expert specialization at equal or better loss.

Writes to --out: summary.csv and summary.md (one row per run), summary.json, loss.png (training and held-out loss),
load.png (max/mean expert load), heatmaps.png (p(expert | domain) per layer), specialization.png, and command.txt.
Reruns resume finished or partial runs from WORKDIR. Each run uses one device: the balance groups, not the mesh,
decide which tokens are pooled (a 'micro' group of 4 is what one rank of a data-parallel job holding 4 sequences
per micro-batch would pool).
"""
from __future__ import annotations

import csv
import os
import sys

import jax
import numpy as np
from absl import app, flags, logging

from framework import metrics as metrics_lib
from launch import runtime_flags, study_io

LAST = 3  # logged records averaged for the end-of-run figures
MICRO_BATCHES = 4


def group_label(group: int, batch_size: int, micro_rows: int) -> str:
  if group == batch_size:
    return f'global ({group})'
  if group == micro_rows:
    return f'micro ({group})'
  return 'sequence (1)' if group == 1 else f'group ({group})'


def run_config(base, group: int, seed: int, steps: int):
  cfg = base.copy_and_resolve_references()
  cfg.seed = seed
  cfg.train.update(steps=steps, micro_batches=MICRO_BATCHES)
  cfg.moe.update(balance_scope='group', balance_group=group, balance_exact=False)
  return cfg


def summarise(records: list[dict]) -> dict:
  """End-of-run figures from one run's metrics.jsonl records."""
  train = [r for r in records if 'moe_counts' in r]
  last = train[-LAST:]
  evals = [r for r in records if 'eval_loss' in r]
  domain = np.sum([np.asarray(r['moe_domain_counts'], np.float64) for r in last], axis=0)  # [L, D, E]
  p_expert = domain / np.maximum(domain.sum(-1, keepdims=True), 1e-9)  # p(expert | domain)
  return {
      'train_loss': float(np.mean([r['loss'] for r in last])),
      'heldout_loss': float(evals[-1]['eval_loss']) if evals else float('nan'),
      'max_over_mean': float(np.mean([np.mean(r['moe_max_over_mean']) for r in last])),
      'domain_expert_mi_bits': float(np.mean([np.mean(r['moe_domain_mi']) for r in last])),
      'top_expert_share': float(np.mean(p_expert.max(-1))),
      'p_expert_given_domain': p_expert.tolist(),
  }


def train_runs(base, groups, seeds, steps, workdir) -> list[dict]:
  from framework import loop  # pylint: disable=g-import-not-at-top  (after the device flags take effect)
  micro_rows = base.train.batch_size // MICRO_BATCHES
  runs = []
  for group in groups:
    for seed in seeds:
      name = f'group{group}_seed{seed}'
      cfg = run_config(base, group, seed, steps)
      logging.info('run %s: balance group %d sequences, seed %d', name, group, seed)
      loop.train(cfg, os.path.join(workdir, name), devices=jax.devices()[:1])
      records = metrics_lib.read_records(os.path.join(workdir, name))
      runs.append({'name': name, 'group': group, 'label': group_label(group, base.train.batch_size, micro_rows),
                   'seed': seed, 'records': records, **summarise(records)})
  return runs


COLUMNS = ('label', 'group', 'seed', 'train_loss', 'heldout_loss', 'max_over_mean', 'domain_expert_mi_bits',
           'top_expert_share')


def write_tables(runs: list[dict], out: str, command: str) -> None:
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, 'summary.csv'), 'w', newline='', encoding='utf-8') as f:
    w = csv.writer(f)
    w.writerow(COLUMNS)
    for r in runs:
      w.writerow([r[c] if isinstance(r[c], (str, int)) else f'{r[c]:.4f}' for c in COLUMNS])
  lines = ['| balance group | seed | train loss | held-out loss | max/mean load | MI(domain; expert), bits | '
           'top-expert share |', '|---|---|---|---|---|---|---|']
  for r in runs:
    lines.append(f"| {r['label']} | {r['seed']} | {r['train_loss']:.4f} | {r['heldout_loss']:.4f} | "
                 f"{r['max_over_mean']:.3f} | {r['domain_expert_mi_bits']:.3f} | {r['top_expert_share']:.3f} |")
  lines += ['', '| balance group | runs | held-out loss (mean) | MI bits (mean) | max/mean (mean) |',
            '|---|---|---|---|---|']
  for label, group in sorted({(r['label'], r['group']) for r in runs}, key=lambda x: x[1]):
    rs = [r for r in runs if r['group'] == group]
    lines.append(f"| {label} | {len(rs)} | {np.mean([r['heldout_loss'] for r in rs]):.4f} | "
                 f"{np.mean([r['domain_expert_mi_bits'] for r in rs]):.3f} | "
                 f"{np.mean([r['max_over_mean'] for r in rs]):.3f} |")
  study_io.write_summary(out, lines, [{k: v for k, v in r.items() if k != 'records'} for r in runs], command)


def write_plots(runs: list[dict], out: str, domains: tuple[str, ...]) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top  (the [study] extra)

  groups = sorted({r['group'] for r in runs})
  colors = {g: matplotlib.colormaps['viridis'](i / max(len(groups) - 1, 1)) for i, g in enumerate(groups)}
  fig, (ax_train, ax_eval) = study_io.subplots(1, 2, figsize=(11, 4))
  for r in runs:
    train = [x for x in r['records'] if 'loss' in x and 'moe_counts' in x]
    evals = [x for x in r['records'] if 'eval_loss' in x]
    style = '-' if r['seed'] == runs[0]['seed'] else '--'
    ax_train.plot([x['step'] for x in train], [x['loss'] for x in train], style, color=colors[r['group']],
                  label=f"{r['label']} s{r['seed']}")
    ax_eval.plot([x['step'] for x in evals], [x['eval_loss'] for x in evals], style + 'o', color=colors[r['group']])
  ax_train.set(xlabel='step', ylabel='training loss', title='training loss')
  ax_eval.set(xlabel='step', ylabel='held-out loss', title='held-out loss')
  ax_train.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(out, 'loss.png'), dpi=120)

  fig, ax = study_io.subplots(figsize=(6, 4))
  for r in runs:
    train = [x for x in r['records'] if 'moe_max_over_mean' in x]
    ax.plot([x['step'] for x in train], [np.mean(x['moe_max_over_mean']) for x in train], color=colors[r['group']],
            label=f"{r['label']} s{r['seed']}")
  ax.set(xlabel='step', ylabel='max / mean expert load (mean over layers)', title='expert load')
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(out, 'load.png'), dpi=120)

  write_heatmaps(runs, out, domains)

  fig, ax = study_io.subplots(figsize=(5, 3.5))
  for r in runs:
    ax.scatter(r['group'], r['domain_expert_mi_bits'], color=colors[r['group']])
  ax.set(xscale='log', xlabel='balance group (sequences)', ylabel='MI(domain; expert), bits',
         title='specialization vs balance group')
  ax.set_xticks(groups, [str(g) for g in groups])
  fig.tight_layout()
  fig.savefig(os.path.join(out, 'specialization.png'), dpi=120)


def write_heatmaps(runs: list[dict], out: str, domains: tuple[str, ...]) -> None:
  """heatmaps.png: p(expert | domain) per layer for the first seed of each group, on one colour scale from 0 to
  the largest value shown (with top-k routing over many experts no entry comes near 1). Needs only the rows of
  summary.json, so a finished study can be replotted."""
  groups = sorted({r['group'] for r in runs})
  shown = [next(r for r in runs if r['group'] == g) for g in groups]
  n_layers = len(shown[0]['p_expert_given_domain'])
  top = max(float(np.max(r['p_expert_given_domain'])) for r in shown)
  fig, axes = study_io.subplots(len(shown), n_layers, figsize=(2.6 * n_layers + 0.8, 1.9 * len(shown)),
                                squeeze=False)
  for i, r in enumerate(shown):
    for layer in range(n_layers):
      ax = axes[i][layer]
      image = ax.imshow(np.asarray(r['p_expert_given_domain'][layer]), vmin=0, vmax=top, cmap='magma',
                        aspect='auto')
      ax.set_yticks(range(len(domains)), domains if layer == 0 else [''] * len(domains), fontsize=7)
      ax.set_xticks([])
      ax.set_title(f"{r['label']}, layer {layer}", fontsize=8)
  fig.suptitle('p(expert | domain), last logged steps (seed shown: first)', fontsize=9)
  fig.tight_layout()
  fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label='p(expert | domain)')
  fig.savefig(os.path.join(out, 'heatmaps.png'), dpi=120)


def study(config_path: str, workdir: str, out: str, groups, seeds, steps: int, overrides=None) -> list[dict]:
  from framework import domains  # pylint: disable=g-import-not-at-top
  base = study_io.load_config(config_path)
  for key, value in (overrides or {}).items():
    section, field = key.split('.')
    base[section][field] = value
  if base.data.source != 'domains' or not base.moe.num_experts:
    raise ValueError(f'{config_path}: the study needs an MoE config (moe.num_experts > 0) on the domains data '
                     "(data.source='domains')")
  runs = train_runs(base, [int(g) for g in groups], [int(s) for s in seeds], steps, workdir)
  command = 'python -m launch.moe_balance ' + ' '.join(sys.argv[1:]) if sys.argv[0].endswith('moe_balance.py') \
      else f'study({config_path!r}, groups={list(groups)}, seeds={list(seeds)}, steps={steps})'
  write_tables(runs, out, command)
  write_plots(runs, out, domains.DOMAINS)
  return runs


def define_flags() -> None:
  """The command line's flags. Defined only when run as a script: absl flags are process-wide, and other
  launchers (imported together in tests) define --workdir, --steps and --config too."""
  flags.DEFINE_string('workdir', None, 'Directory for the runs (one subdirectory each).')
  flags.DEFINE_string('out', 'results/moe_balance', 'Where the table and plots go.')
  flags.DEFINE_list('groups', ['1', '2', '4', '16'], 'Balance group sizes in sequences.')
  flags.DEFINE_list('seeds', ['0', '1'], 'Seeds (initialisation and data order), each group run per seed.')
  flags.DEFINE_integer('steps', 300, 'Optimizer steps per run.')
  flags.DEFINE_string('study_config', 'configs/moe_tiny.py', 'The MoE config file the runs start from.')
  flags.mark_flags_as_required(['workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  runtime_flags.exit_on_user_error(runtime_flags.apply)
  runs = runtime_flags.exit_on_user_error(study, f.study_config, f.workdir, f.out, f.groups, f.seeds, f.steps)
  with open(os.path.join(f.out, 'summary.md'), encoding='utf-8') as fh:
    print(fh.read())
  logging.info('%d runs; table and plots in %s', len(runs), f.out)


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=runtime_flags.parse_flags)
