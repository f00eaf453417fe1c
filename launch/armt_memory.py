"""Does the ARMT memory work? Key-value recall across segments, with the memory on and off.

  python -m launch.armt_memory [--steps=600 --batch=32 --pairs=8] [--out=results/armt_memory]

Each row is three segments of 2 x --pairs tokens: the first lists --pairs key-value pairs (keys drawn without
replacement from 32, values from 16), the second is filler (random tokens of their own range), the third asks the
keys again in another order, each followed by its value. Only the answers count in the loss and the accuracy, so
within its own segment the model sees a key but never its value: only the memory can carry it from the first
segment. Chance is 1/16 (6.25%, loss ln 16 = 2.77). The same small ARMT (2 layers, d 64, --memory_tokens per
segment of 16; each memory token writes one key-value association per layer and segment) trains twice with the
same data and initialisation, once with armt.memory=False.

Writes to --out: curves.csv (accuracy and loss on 512 fixed held-out rows every --eval_every steps), curves.png,
summary.json, summary.md and command.txt. Each run takes a few minutes on 2 CPU cores and restarts from scratch.
"""
from __future__ import annotations

import csv
import os

import numpy as np
from absl import app, flags, logging

from launch import runtime_flags, study_io

KEYS, VALUES, FILLER = (2, 34), (40, 56), (60, 120)  # token ranges [lo, hi)


def config(pairs: int, steps: int, batch: int, memory: bool, memory_tokens: int = 4, seed: int = 0):
  from framework import config as config_lib  # pylint: disable=g-import-not-at-top
  cfg = config_lib.defaults()
  cfg.seed = seed
  seg = 2 * pairs
  cfg.model.update(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=64)
  cfg.armt.update(segment_len=seg, memory_tokens=memory_tokens, d_mem=16, executor='diagonal', memory=memory)
  cfg.data.update(source='array', seq_len=3 * seg)  # the batches are made here; the data section gives the shape
  cfg.train.update(steps=steps, batch_size=batch)
  cfg.optim.update(lr=3e-3, warmup_steps=50, schedule='cosine', weight_decay=0.0)
  cfg.mesh.update(data=1)
  return cfg


def rows(rng: np.random.Generator, n: int, pairs: int) -> dict[str, np.ndarray]:
  """n task rows as a train batch (inputs, targets, weights on the answers, positions, segment ids)."""
  seg = 2 * pairs
  keys = np.stack([rng.choice(np.arange(*KEYS), pairs, replace=False) for _ in range(n)])
  values = rng.integers(*VALUES, size=(n, pairs))
  order = np.argsort(rng.random((n, pairs)), axis=1)
  tokens = np.zeros((n, 3 * seg + 1), np.int32)
  tokens[:, 0:seg:2], tokens[:, 1:seg:2] = keys, values
  tokens[:, seg:2 * seg] = rng.integers(*FILLER, size=(n, seg))
  asked = np.take_along_axis(keys, order, 1)
  tokens[:, 2 * seg:3 * seg:2], tokens[:, 2 * seg + 1:3 * seg:2] = asked, np.take_along_axis(values, order, 1)
  weights = np.zeros((n, 3 * seg), np.float32)
  weights[:, 2 * seg:3 * seg:2] = 1.0  # predicting the token after each asked key: its value
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'weights': weights,
          'positions': np.broadcast_to(np.arange(3 * seg, dtype=np.int32), (n, 3 * seg)).copy(),
          'segment_ids': np.ones((n, 3 * seg), np.int32)}


def train_one(cfg, pairs: int, eval_every: int, heldout: int = 512) -> list[dict]:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from framework.mesh import make_sharder  # pylint: disable=g-import-not-at-top
  from framework.train import Trainer  # pylint: disable=g-import-not-at-top

  trainer = Trainer(cfg, make_sharder(cfg, jax.devices()[:1]))
  state = trainer.init(jax.random.key(cfg.seed))
  test = rows(np.random.default_rng(10_000), heldout, pairs)

  @jax.jit
  def evaluate(params, batch):
    logits, _ = trainer.model.apply({'params': params}, batch['inputs'])
    w = batch['weights']
    log_p = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(log_p, batch['targets'][..., None], -1)[..., 0]
    hit = (jnp.argmax(logits, -1) == batch['targets']).astype(jnp.float32)
    return jnp.sum(nll * w) / jnp.sum(w), jnp.sum(hit * w) / jnp.sum(w)

  rng = np.random.default_rng(cfg.seed)
  curve = []
  for step in range(cfg.train.steps + 1):
    if step % eval_every == 0 or step == cfg.train.steps:
      loss, acc = jax.device_get(evaluate(state.params, test))
      curve.append({'step': step, 'loss': float(loss), 'accuracy': float(acc)})
      logging.info('memory=%s step %d: held-out answer loss %.3f, accuracy %.1f%%', cfg.armt.memory, step, loss,
                   100 * acc)
    if step < cfg.train.steps:
      state, _ = trainer.train_step(state, trainer.device_batch(rows(rng, cfg.train.batch_size, pairs)))
  return curve


def study(out: str, steps: int, batch: int, pairs: int, eval_every: int, memory_tokens: int = 4,
          command: str = '') -> dict:
  curves = {memory: train_one(config(pairs, steps, batch, memory, memory_tokens), pairs, eval_every)
            for memory in (True, False)}
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, 'curves.csv'), 'w', newline='', encoding='utf-8') as f:
    w = csv.writer(f)
    w.writerow(('memory', 'step', 'heldout_answer_loss', 'heldout_accuracy'))
    for memory, curve in curves.items():
      for p in curve:
        w.writerow((memory, p['step'], p['loss'], p['accuracy']))
  chance = 1 / (VALUES[1] - VALUES[0])
  summary = {'chance_accuracy': chance, 'steps': steps, 'batch': batch, 'pairs': pairs,
             'memory_tokens': memory_tokens,
             **{f'memory_{"on" if m else "off"}': c[-1] for m, c in curves.items()}}
  lines = ['| memory | final held-out answer loss | final held-out accuracy |', '|---|---|---|']
  for m, c in curves.items():
    lines.append(f"| {'on' if m else 'off'} | {c[-1]['loss']:.3f} | {100 * c[-1]['accuracy']:.1f}% |")
  lines.append(f'\nChance: {100 * chance:.2f}% (loss {np.log(1 / chance):.2f}); {steps} steps of {batch} rows; '
               f'{pairs} pairs, {memory_tokens} memory tokens per segment.')
  study_io.write_summary(out, lines, summary, command)

  fig, (ax_a, ax_l) = study_io.subplots(1, 2, figsize=(10, 4))
  for m, c in curves.items():
    label = f"memory {'on' if m else 'off'}"
    ax_a.plot([p['step'] for p in c], [100 * p['accuracy'] for p in c], 'o-', ms=3, label=label)
    ax_l.plot([p['step'] for p in c], [p['loss'] for p in c], 'o-', ms=3, label=label)
  ax_a.axhline(100 * chance, color='gray', ls=':', label='chance')
  ax_l.axhline(np.log(1 / chance), color='gray', ls=':', label='chance')
  ax_a.set(xlabel='step', ylabel='held-out answer accuracy (%)', title='key-value recall across segments')
  ax_l.set(xlabel='step', ylabel='held-out answer loss', title='answer loss')
  ax_a.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(out, 'curves.png'), dpi=120)
  return summary


def define_flags() -> None:
  flags.DEFINE_string('out', 'results/armt_memory', 'Where the curves and the summary go.')
  flags.DEFINE_integer('steps', 600, 'Training steps per run.')
  flags.DEFINE_integer('batch', 32, 'Rows per step.')
  flags.DEFINE_integer('pairs', 8, 'Key-value pairs per row (segments are 2 x pairs tokens).')
  flags.DEFINE_integer('eval_every', 50, 'Steps between held-out evaluations.')
  flags.DEFINE_integer('memory_tokens', 4, 'Memory tokens per segment (each writes one key-value pair per layer).')


def main(argv):
  f = flags.FLAGS
  study_io.run_main(argv, 'launch.armt_memory', study, f.out, f.steps, f.batch, f.pairs, f.eval_every,
                    f.memory_tokens, out=f.out)


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=runtime_flags.parse_flags)
