"""The batch-size sweep's plots (launch/sweep.py): steps vs examples with the fitted hyperbola, steps vs batch size
against perfect linear scaling, and B_simple over training."""
from __future__ import annotations

import os

import numpy as np

from launch import study_io


def write(points: list[dict], summary: dict, out: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top  (the [study] extra)

  best = summary['best']
  sizes = sorted({p['batch_size'] for p in points})
  colors = {b: matplotlib.colormaps['viridis'](i / max(len(sizes) - 1, 1)) for i, b in enumerate(sizes)}
  fit = summary.get('fit')

  fig, ax = study_io.subplots(figsize=(6, 4.5))
  for p in points:
    if p['reached']:
      ax.scatter(p['examples'], p['steps'], color=colors[p['batch_size']], alpha=0.35, s=18)
  for b in best:
    ax.scatter(b['examples'], b['steps'], color=colors[b['batch_size']], s=50, edgecolor='k',
               label=f"B={b['batch_size']} (best LR)")
  if fit:
    grid = np.geomspace(min(sizes) / 4, max(sizes) * 4, 200)
    ax.plot(fit['e_min'] * (1 + grid / fit['b_crit']), fit['s_min'] * (1 + fit['b_crit'] / grid), 'k--',
            label=f"fit: S_min={fit['s_min']:.0f}, E_min={fit['e_min']:.0f}, B_crit={fit['b_crit']:.1f}")
    ax.axhline(fit['s_min'], color='gray', lw=0.6)
    ax.axvline(fit['e_min'], color='gray', lw=0.6)
  ax.set(xscale='log', yscale='log', xlabel='examples to target', ylabel='steps to target',
         title=f"steps vs examples to held-out loss {summary['target_loss']}")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(out, 'steps_vs_examples.png'), dpi=120)

  fig, ax = study_io.subplots(figsize=(6, 4.5))
  if best:
    b0 = best[0]
    xs = np.array([b['batch_size'] for b in best], dtype=float)
    ax.plot(xs, [b['steps'] for b in best], 'o-', label='measured (best LR)')
    ax.plot(xs, b0['steps'] * b0['batch_size'] / xs, ':', color='gray', label='perfect linear scaling')
    ax.plot(xs, 1.2 * b0['steps'] * b0['batch_size'] / xs, ':', color='orange', label='linear scaling + 20%')
  if fit:
    grid = np.geomspace(min(sizes), max(sizes), 100)
    ax.plot(grid, fit['s_min'] * (1 + fit['b_crit'] / grid), 'k--', label='hyperbola fit')
    ax.axvline(fit['b_crit'], color='k', lw=0.6)
  if summary.get('cbs_20pct'):
    ax.axvline(summary['cbs_20pct'], color='orange', lw=0.8)
  ax.set(xscale='log', yscale='log', xlabel='batch size (sequences)', ylabel='steps to target',
         title='steps to target vs batch size')
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(out, 'steps_vs_batch.png'), dpi=120)

  fig, (ax_e, ax_l) = study_io.subplots(1, 2, figsize=(11, 4))
  factors = {b['batch_size']: b['factor'] for b in best}
  for p in points:
    if p['batch_size'] in factors and p['factor'] == factors[p['batch_size']] and p['noise']:
      examples, loss, b_simple = (np.array(x, dtype=float) for x in zip(*p['noise']))
      keep = np.isfinite(b_simple) & (b_simple > 0)
      ax_e.plot(examples[keep], b_simple[keep], color=colors[p['batch_size']], label=f"B={p['batch_size']}")
      ax_l.plot(loss[keep], b_simple[keep], color=colors[p['batch_size']])
  if fit:
    for ax in (ax_e, ax_l):
      ax.axhline(fit['b_crit'], color='k', ls='--', lw=0.8, label='fitted B_crit')
  ax_e.set(xscale='log', yscale='log', xlabel='examples', ylabel='B_simple (sequences)',
           title='noise scale over training (best LR per batch)')
  ax_l.set(yscale='log', xlabel='training loss', ylabel='B_simple (sequences)', title='noise scale vs loss')
  ax_l.invert_xaxis()
  ax_e.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(out, 'b_simple.png'), dpi=120)
