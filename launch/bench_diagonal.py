"""`launch.bench --suite=diagonal`: ARMT's diagonal executor against the sequential one and against a plain
full-attention transformer of the same size over the whole context, forward and forward + backward, same run.

For each (layers, segments, segment length) the variants run the same batch with the same dense weights (the
ARMT adds its memory embeddings and projections; the full-attention model attends over all the context at once,
the ARMT over segment + memory rows), alternating call by call (launch/timing.py). The diagonal executor also
runs with armt.memory=False: the difference is what the memory reads and writes cost (the profile that decides
whether they need a kernel of their own). A second table times the diagonal executor's cell matmuls
(armt.cell_matmul) against the batched matmul, same run: ragged_dot everywhere, the Pallas grouped matmul off CPU
(on CPU it would time the interpreter). --quick keeps the small cases only.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

CASES = ((2, 4, 64), (4, 8, 64), (4, 16, 128), (8, 16, 128), (4, 16, 256))
QUICK = CASES[:2]
D_MODEL, HEADS, D_FF, MEMORY, BATCH = 128, 4, 512, 8, 2


def _model_config(layers: int, seg: int, executor: str | None, memory: bool = True, cell_matmul: str = 'auto'):
  """The benchmark model's ModelConfig, from the config schema (the plain decoder when executor is None)."""
  from framework import config as config_lib  # pylint: disable=g-import-not-at-top
  from framework.models.armt_config import ARMTConfig  # pylint: disable=g-import-not-at-top
  from framework.models.layers import ModelConfig  # pylint: disable=g-import-not-at-top
  cfg = config_lib.defaults()
  cfg.model.update(vocab_size=512, d_model=D_MODEL, n_layers=layers, n_heads=HEADS, n_kv_heads=HEADS, d_ff=D_FF,
                   max_seq_len=1 << 16, attention_impl='xla')
  if executor is not None:
    cfg.armt.update(segment_len=seg, memory_tokens=MEMORY, d_mem=16, executor=executor, memory=memory,
                    cell_matmul=cell_matmul)
  return ModelConfig.from_config(cfg.model, armt=ARMTConfig.from_config(cfg))


def _fns(model, params, tokens):
  """(forward, forward + backward) of the summed logits, each a step for time_interleaved."""
  def loss(p):
    logits, _ = model.apply({'params': p}, tokens, jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape),
                            jnp.ones_like(tokens))
    return jnp.mean(logits)
  # The state is (parameters, last result): returning the result keeps XLA from dropping the work.
  fwd = jax.jit(lambda state, _: (state[0], loss(state[0])))
  grad = jax.jit(lambda state, _: (state[0], jax.grad(loss)(state[0])))
  return fwd, grad


def run(steps: int, quick: bool) -> None:
  from framework.mesh import Sharder  # pylint: disable=g-import-not-at-top
  from framework.models.armt import ARMT  # pylint: disable=g-import-not-at-top
  from framework.models.transformer import Transformer  # pylint: disable=g-import-not-at-top
  from launch.timing import time_interleaved  # pylint: disable=g-import-not-at-top

  sharder = Sharder(None, ())
  print(f'# diagonal suite: d {D_MODEL}, {HEADS} heads, d_ff {D_FF}, {MEMORY} memory tokens, batch {BATCH}, f32; '
        f'{jax.devices()[0].device_kind}; median of {steps} alternating calls')
  print('| layers | segments | segment | context | pass | sequential ms | diagonal ms | full attention ms | '
        'diagonal vs sequential | diagonal vs full | memory ops share of diagonal |')
  print('|---|---|---|---|---|---|---|---|---|---|---|')
  for layers, segments, seg in (QUICK if quick else CASES):
    tokens = jax.random.randint(jax.random.key(0), (BATCH, segments * seg), 0, 512)
    models = {'sequential': ARMT(_model_config(layers, seg, 'sequential'), sharder),
              'diagonal': ARMT(_model_config(layers, seg, 'diagonal'), sharder),
              'no memory': ARMT(_model_config(layers, seg, 'diagonal', memory=False), sharder),
              'full': Transformer(_model_config(layers, seg, None), sharder)}
    params = nn.meta.unbox(jax.jit(models['diagonal'].init)(jax.random.key(0), tokens)['params'])
    dense = nn.meta.unbox(jax.jit(models['full'].init)(jax.random.key(0), tokens, tokens, tokens)['params'])
    dense = {**dense, 'layers': params['layers'], 'embedding': params['embedding'], 'head': params['head']}
    weights = {'sequential': params, 'diagonal': params, 'no memory': params, 'full': dense}
    fns = {name: _fns(m, weights[name], tokens) for name, m in models.items()}
    for pass_name, index in (('forward', 0), ('forward + backward', 1)):
      start = {name: (weights[name], jnp.zeros(()) if index == 0 else weights[name]) for name in fns}
      times = time_interleaved({name: (f[index], start[name], None) for name, f in fns.items()}, steps)
      s, d, f, bare = (1e3 * times[k] for k in ('sequential', 'diagonal', 'full', 'no memory'))
      print(f'| {layers} | {segments} | {seg} | {segments * seg} | {pass_name} | {s:.1f} | {d:.1f} | {f:.1f} | '
            f'{s / d:.2f}x | {f / d:.2f}x | {100 * (d - bare) / d:.0f}% |')

  _cell_matmul_table(steps, QUICK if quick else CASES[1:3], sharder)


def _cell_matmul_table(steps: int, cases, sharder) -> None:
  from framework.models.armt import ARMT  # pylint: disable=g-import-not-at-top
  from launch.timing import time_interleaved  # pylint: disable=g-import-not-at-top
  impls = ('batched', 'ragged_dot') + (('pallas',) if jax.default_backend() != 'cpu' else ())
  print()
  print('| layers | segments | segment | pass | ' + ' | '.join(f'{i} ms' for i in impls) + ' | ' +
        ' | '.join(f'{i} vs batched' for i in impls[1:]) + ' |')
  print('|---|---|---|---|' + '---|' * (2 * len(impls) - 1))
  for layers, segments, seg in cases:
    tokens = jax.random.randint(jax.random.key(0), (BATCH, segments * seg), 0, 512)
    models = {i: ARMT(_model_config(layers, seg, 'diagonal', cell_matmul=i), sharder) for i in impls}
    params = nn.meta.unbox(jax.jit(models['batched'].init)(jax.random.key(0), tokens)['params'])
    fns = {i: _fns(m, params, tokens) for i, m in models.items()}
    for pass_name, index in (('forward', 0), ('forward + backward', 1)):
      start = (params, jnp.zeros(()) if index == 0 else params)
      times = time_interleaved({i: (f[index], start, None) for i, f in fns.items()}, steps)
      ms = [1e3 * times[i] for i in impls]
      print(f'| {layers} | {segments} | {seg} | {pass_name} | ' + ' | '.join(f'{t:.1f}' for t in ms) + ' | ' +
            ' | '.join(f'{ms[0] / t:.2f}x' for t in ms[1:]) + ' |')
