"""The associative recurrent memory transformer (framework/models/armt.py): the DPFP map and the memory update
against the paper's formulas written out here, and the diagonal executor against the sequential one (logits,
final memory, gradients) over several (layers, segments), a ragged last segment and batch > 1, with random
non-zero W_V so the memory really carries information."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from framework import config as config_lib
from framework.mesh import Sharder
from framework.models import armt as armt_lib
from framework.models.armt_config import ARMTConfig
from framework.models.layers import ModelConfig


def test_dpfp_matches_its_definition():
  x = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
  u = np.concatenate([np.maximum(x, 0), np.maximum(-x, 0)], -1)  # length 2d = 10
  d2 = u.shape[-1]
  expected = np.concatenate([[[u[r, i] * u[r, (i - j) % d2] for i in range(d2)] for r in range(3)]
                             for j in (1, 2, 3)], -1)
  np.testing.assert_allclose(armt_lib.dpfp(jnp.asarray(x)), expected, rtol=1e-6)


def test_memory_write_and_read_follow_the_formulas():
  rng = np.random.default_rng(1)
  b, m, d, d_mem = 2, 3, 4, 2
  w = {'wk': rng.standard_normal((d, d_mem)), 'wv': rng.standard_normal((d, d)), 'wb': rng.standard_normal(d),
       'bb': np.float64(0.3), 'wq': rng.standard_normal((d, d_mem))}
  w = {k: jnp.asarray(v, jnp.float32) for k, v in w.items()}
  mem = jnp.asarray(rng.standard_normal((b, m, d)), jnp.float32)
  a = jnp.asarray(np.abs(rng.standard_normal((b, 6 * d_mem, d))), jnp.float32)
  z = jnp.asarray(np.abs(rng.standard_normal((b, 6 * d_mem))), jnp.float32)
  new_a, new_z = armt_lib.memory_write(mem, w, a, z, False)
  first_a, first_z = armt_lib.memory_write(mem, w, jnp.zeros_like(a), jnp.zeros_like(z), True)
  for i in range(b):  # one sequence at a time, one memory token at a time, in NumPy
    exp_a, exp_z = np.asarray(a[i], np.float64), np.asarray(z[i], np.float64)
    f_a, f_z = np.zeros_like(exp_a), np.zeros_like(exp_z)
    for j in range(m):
      x = np.asarray(mem[i, j], np.float64)
      k = np.asarray(armt_lib.dpfp(jnp.asarray(x @ np.asarray(w['wk']), jnp.float32)), np.float64)
      v = x @ np.asarray(w['wv'])
      beta = 1 / (1 + np.exp(-(x @ np.asarray(w['wb']) + 0.3)))
      v_old = k @ np.asarray(a[i]) / (np.asarray(z[i]) @ k + 1e-5)
      gamma = np.clip(1 - (np.asarray(z[i]) @ k + 1e-5) / (k @ k + 1e-5), 0, 1)
      exp_a += beta * np.outer(k, v - v_old)
      exp_z += gamma * k
      f_a += beta * np.outer(k, v)  # first segment: v_old = 0, gamma = 1
      f_z += k
    np.testing.assert_allclose(new_a[i], exp_a, rtol=2e-5, atol=1e-5)
    np.testing.assert_allclose(new_z[i], exp_z, rtol=2e-5, atol=1e-5)
    np.testing.assert_allclose(first_a[i], f_a, rtol=2e-5, atol=1e-5)
    np.testing.assert_allclose(first_z[i], f_z, rtol=2e-5, atol=1e-5)
  x = mem  # read: x + phi(W_Q x) A / (z . phi(W_Q x) + 1e-5), and x itself on the first segment
  q = np.asarray(armt_lib.dpfp(x @ w['wq']), np.float64)
  expected = np.asarray(x) + np.einsum('btk,bkd->btd', q, a) / (np.einsum('btk,bk->bt', q, z) + 1e-5)[..., None]
  np.testing.assert_allclose(armt_lib.memory_read(x, w['wq'], a, z, False), expected, rtol=2e-5, atol=1e-5)
  np.testing.assert_array_equal(armt_lib.memory_read(x, w['wq'], a, z, True), x)


def test_wavefronts_cover_every_cell_once_in_dependency_order():
  for layers, segments in ((3, 2), (3, 3), (2, 5), (1, 4), (4, 1)):
    seen = {}
    for t, (lo, hi) in enumerate(armt_lib.wavefronts(layers, segments)):
      for l in range(lo, hi + 1):
        seen[(l, t - l)] = t
    assert sorted(seen) == [(l, s) for l in range(layers) for s in range(segments)]
    for (l, s), t in seen.items():  # (l - 1, s) and (l, s - 1) ran at the step before
      assert all(seen[dep] == t - 1 for dep in ((l - 1, s), (l, s - 1)) if dep in seen)


def model_config(layers, memory=True, **armt):
  cfg = config_lib.defaults()
  cfg.model.update(vocab_size=64, d_model=32, n_layers=layers, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64)
  cfg.armt.update(segment_len=4, memory_tokens=2, d_mem=4, memory=memory, **armt)
  return ModelConfig.from_config(cfg.model, armt=ARMTConfig.from_config(cfg))


def random_params(model, tokens, seed=0):
  """Initialised parameters with W_V, W_beta's bias and the memory embeddings random and non-zero."""
  params = dict(nn.meta.unbox(jax.jit(model.init)(jax.random.key(seed), tokens)["params"]))
  rng = np.random.default_rng(seed)
  # O(1) embeddings and memory projections (init's 0.02 would leave A ~ 1e-7) and a non-zero W_V.
  for name, scale in (('mem_wv', 0.3), ('mem_bb', 1.0), ('embedding', 1.0), ('memory', 1.0), ('mem_wk', 0.5),
                      ('mem_wq', 0.5)):
    params[name] = jnp.asarray(rng.standard_normal(params[name].shape) * scale, jnp.float32)
  return params


CASES = [
    (3, 8, 2),    # S = 2 < L = 3
    (3, 12, 1),   # S = L = 3
    (2, 19, 2),   # S = 5 > L = 2, the last segment 3 tokens of 4 (padded), batch 2
]


def _run(layers, tokens_len, batch, executor, grads, **armt):
  """(logits, A, z, steps the executor ran, gradients or None, the jaxpr of the step) of a random ARMT on random
  tokens; `armt`: more armt config fields."""
  model = armt_lib.ARMT(model_config(layers, **armt), Sharder(None, ()))
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 64, (batch, tokens_len)), jnp.int32)
  params = random_params(model, tokens)
  weights = jnp.asarray(np.random.default_rng(3).standard_normal((batch, tokens_len, 64)), jnp.float32)
  counted = []

  def loss(p):  # the executor's loop runs while this traces: `steps` is what it ran
    logits, (a, z), steps = model.apply({'params': p}, tokens, executor, method=armt_lib.ARMT.forward)
    counted.append(steps)
    return jnp.sum(logits * weights) + jnp.sum(a) + jnp.sum(z), (logits, a, z)
  fn = jax.value_and_grad(loss, has_aux=True) if grads else loss
  out = jax.jit(fn)(params)
  (_, (logits, a, z)), g = out if grads else (out, None)
  return logits, a, z, counted[0], g, str(jax.make_jaxpr(fn)(params))


def _close(actual, desired, name):
  """f32 agreement: |diff| <= 1e-4 |x| + 2e-5 max|x| (the two executors sum in different orders)."""
  desired = np.asarray(desired)
  np.testing.assert_allclose(actual, desired, rtol=1e-4, atol=2e-5 * float(np.abs(desired).max()), err_msg=name)


@pytest.mark.parametrize('layers,tokens_len,batch', [pytest.param(*c, marks=pytest.mark.slow) if c == CASES[1] else c
                                                     for c in CASES])
def test_diagonal_equals_sequential(layers, tokens_len, batch):
  segments = -(-tokens_len // 4)
  seq, diag = (_run(layers, tokens_len, batch, e, grads=False) for e in ('sequential', 'diagonal'))
  assert seq[3] == layers * segments and diag[3] == layers + segments - 1  # cells run; wavefront steps run
  assert seq[0].shape == (batch, tokens_len, 64)
  assert float(jnp.abs(seq[1]).max()) > 0.1  # the memory holds something
  for name, x, y in zip(('logits', 'A', 'z'), seq[:3], diag[:3]):
    _close(y, x, name)


def _assert_same_gradients(seq, diag):
  theirs = dict(jax.tree_util.tree_leaves_with_path(diag[4]))
  for path, g in jax.tree_util.tree_leaves_with_path(seq[4]):
    _close(theirs[path], g, jax.tree_util.keystr(path))


@pytest.mark.parametrize('case', [pytest.param(c, marks=pytest.mark.slow) if c != CASES[-1] else c for c in CASES])
def test_diagonal_gradients_equal_sequential(case):
  seq, diag = (_run(*case, e, grads=True) for e in ('sequential', 'diagonal'))
  assert 'ragged_dot' not in diag[5] and 'pallas_call' not in diag[5]  # CPU's default: the batched matmul
  _assert_same_gradients(seq, diag)


@pytest.mark.parametrize('impl, primitive', [('ragged_dot', 'ragged_dot_general'),
                                             pytest.param('pallas', 'pallas_call', marks=pytest.mark.slow)])
def test_grouped_matmul_cells_equal_sequential(impl, primitive):
  """armt.cell_matmul: the diagonal executor's weight matmuls as one grouped matmul over a wavefront's cells
  (ragged_dot, or the Pallas kernel in interpret mode here), forward and backward, against the sequential
  executor, which runs each cell alone through plain matmuls."""
  case = CASES[-1]
  seq = _run(*case, 'sequential', grads=True, cell_matmul=impl)
  diag = _run(*case, 'diagonal', grads=True, cell_matmul=impl)
  assert primitive in diag[5] and primitive not in seq[5]
  for name, x, y in zip(('logits', 'A', 'z'), seq[:3], diag[:3]):
    _close(y, x, name)
  _assert_same_gradients(seq, diag)


def test_without_memory_segments_do_not_see_each_other():
  """memory=False: a segment's logits do not depend on the tokens of earlier segments (the ablation's premise),
  and with memory they do."""
  tokens = np.random.default_rng(4).integers(0, 64, (1, 12))
  changed = tokens.copy()
  changed[0, :4] = (changed[0, :4] + 1) % 64  # only the first segment differs
  for memory, differs in ((False, False), (True, True)):
    model = armt_lib.ARMT(model_config(2, memory=memory), Sharder(None, ()))
    params = random_params(model, jnp.asarray(tokens, jnp.int32))
    apply = jax.jit(lambda t, p=params, mdl=model: mdl.apply({'params': p}, t)[0])
    a, b = apply(jnp.asarray(tokens, jnp.int32)), apply(jnp.asarray(changed, jnp.int32))
    assert bool(jnp.any(jnp.abs(a[:, 4:] - b[:, 4:]) > 1e-4)) == differs, memory


def test_every_segment_is_written_into_the_memory():
  """Changing the tokens of any one segment changes the memory after the last: each segment's memory rows see
  their own segment's tokens (a regression: once only the first segment's tokens were marked real)."""
  model = armt_lib.ARMT(model_config(2), Sharder(None, ()))
  tokens = np.random.default_rng(6).integers(0, 64, (1, 12))  # three segments of 4
  params = random_params(model, jnp.asarray(tokens, jnp.int32))
  memory = jax.jit(lambda t: model.apply({'params': params}, t, method=armt_lib.ARMT.forward)[1][0])
  base = memory(jnp.asarray(tokens, jnp.int32))
  for segment in range(3):
    changed = tokens.copy()
    changed[0, 4 * segment:4 * segment + 4] = (changed[0, 4 * segment:4 * segment + 4] + 1) % 64
    assert float(jnp.abs(memory(jnp.asarray(changed, jnp.int32)) - base).max()) > 1e-3, segment


def test_generation_segment_by_segment_equals_recomputing_everything():
  """Greedy generation that carries the memory across segments picks the tokens a full forward over the whole
  sequence so far picks (the independent O(n^2) reference), across two segment boundaries."""
  model = armt_lib.ARMT(model_config(2), Sharder(None, ()))
  prompt = jnp.asarray(np.random.default_rng(5).integers(0, 64, (2, 6)), jnp.int32)
  params = random_params(model, prompt)
  out = armt_lib.generate(model, params, prompt, max_new=7)
  assert out.shape == (2, 13)
  np.testing.assert_array_equal(out[:, :6], prompt)
  # The reference: one forward over all 13 tokens with only the first n real (the rest a padded tail).
  full = jax.jit(lambda t, n: model.apply({'params': params}, t, None, None, n, method=armt_lib.ARMT.forward)[0])
  for n in range(6, 13):
    np.testing.assert_array_equal(out[:, n], jnp.argmax(full(out, n)[:, n - 1], -1), err_msg=f'token {n}')


def test_trains_through_the_loop_with_checkpoints(tmp_path):
  """launch.train's driver on an ARMT config: steps run, the loss falls, a checkpoint holds the memory weights."""
  from framework import loop  # pylint: disable=import-outside-toplevel
  from framework import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  cfg = config_lib.defaults()
  cfg.model.update(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64)
  cfg.armt.update(segment_len=8, memory_tokens=2, d_mem=4)
  cfg.data.update(seq_len=20, max_corpus_bytes=2_000_000)  # 3 segments, the last 4 of 8 tokens
  cfg.train.update(steps=4, batch_size=4, log_every=1, eval_every=0)
  cfg.optim.update(lr=3e-3, warmup_steps=1)
  cfg.checkpoint.update(every_steps=4, async_save=False)
  cfg.metrics.update(peak_flops_per_device=1e12, tensorboard=False)
  loop.train(cfg, str(tmp_path), devices=jax.devices()[:1])
  losses = [json.loads(line)['loss'] for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert len(losses) == 4 and losses[-1] < losses[0]
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path / 'checkpoints'), cfg.checkpoint)
  try:
    assert checkpointer.latest_step() == 4
  finally:
    checkpointer.close()


def test_bad_armt_configs_name_the_field():
  cfg = config_lib.defaults()
  cfg.armt.segment_len = 16
  cfg.model.attention_impl = 'pallas'
  with pytest.raises(ValueError, match="config model.attention_impl: the ARMT executors"):
    config_lib.validate(cfg, num_devices=1)
  cfg.model.attention_impl = 'xla'
  cfg.armt.executor = 'parallel'
  with pytest.raises(ValueError, match='config armt.executor'):
    config_lib.validate(cfg, num_devices=1)
  cfg.armt.executor = 'diagonal'
  cfg.moe.num_experts = 4
  with pytest.raises(ValueError, match='config armt.segment_len: .*moe.num_experts=0'):
    config_lib.validate(cfg, num_devices=1)


@pytest.mark.slow
def test_remat_gives_the_same_gradients():
  for executor in ('sequential', 'diagonal'):
    grads = []
    for remat in (False, True):
      model = armt_lib.ARMT(model_config(2, remat=remat, executor=executor), Sharder(None, ()))
      tokens = jnp.asarray(np.random.default_rng(2).integers(0, 64, (2, 12)), jnp.int32)
      params = random_params(model, tokens)
      grads.append(jax.jit(jax.grad(lambda p, m=model: jnp.sum(m.apply({'params': p}, tokens)[0] ** 2)))(params))
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
      _close(b, a, executor)


@pytest.mark.parametrize('cell_matmul', ['batched', pytest.param('ragged_dot', marks=pytest.mark.slow)])
def test_a_train_step_on_a_data_fsdp_tensor_mesh_equals_one_device(cell_matmul):
  """The diagonal executor sharded over 8 devices (data 2 x fsdp 2 x tensor 2: batch, parameters and heads/mlp
  split) takes the same SGD step as on one device: the parameter updates agree to f32 tolerance."""
  from framework.mesh import make_sharder  # pylint: disable=import-outside-toplevel
  from framework.train import Trainer  # pylint: disable=import-outside-toplevel

  def trainer(mesh, n):
    cfg = config_lib.defaults()
    cfg.model.update(vocab_size=512, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64)
    cfg.armt.update(segment_len=4, memory_tokens=2, d_mem=4, executor='diagonal', cell_matmul=cell_matmul)
    cfg.data.seq_len = 14  # 4 segments, the last 2 tokens of 4
    cfg.train.update(batch_size=4, steps=1, z_loss=0.0)
    # A large lr: the update is the gradient times 1000, far above the f32 spacing of the parameters it is read off.
    cfg.optim.update(name='sgd', lr=1e3, momentum=0.0, weight_decay=0.0, grad_clip=0.0, schedule='constant',
                     warmup_steps=0)
    cfg.mesh.update(**mesh)
    config_lib.validate(cfg, num_devices=n)
    return Trainer(cfg, make_sharder(cfg, jax.devices()[:n]))

  one = trainer(dict(data=1), 1)
  state = jax.device_get(one.init(jax.random.key(0)))
  model = armt_lib.ARMT(one.model_cfg, Sharder(None, ()))
  params = random_params(model, jnp.zeros((1, 14), jnp.int32))  # a non-zero W_V: the memory carries something
  state = state.replace(params=jax.tree.map(lambda old, new: np.asarray(new, old.dtype), state.params, params))
  tokens = np.random.default_rng(7).integers(0, 64, (4, 15)).astype(np.int32)
  batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'weights': np.ones((4, 14), np.float32),
           'segment_ids': np.ones((4, 14), np.int32), 'positions': np.tile(np.arange(14, dtype=np.int32), (4, 1))}
  deltas = []
  for t in (one, trainer(dict(data=2, fsdp=2, tensor=2), 8)):
    new, metrics = t.train_step(jax.device_put(state, t.state_shardings), t.device_batch(batch))
    deltas.append(jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), state.params, jax.device_get(new.params)))
    assert np.isfinite(float(metrics['loss']))
  ref = dict(jax.tree_util.tree_leaves_with_path(deltas[0]))
  assert float(np.abs(ref[(jax.tree_util.DictKey('mem_wv'),)]).max()) > 1e-2  # the memory path is trained
  # Tolerance 1e-3 of each tensor's largest update (a lost reduction or a mis-split head is O(1)): the memory
  # reads divide by z . phi(q), which amplifies rounding, the more the more segments the memory has taken in.
  # Measured on these weights: the 8-device step at most 4.4e-4 of the largest update off the one-device step
  # (mem_wq; 1.3e-4 while only the first segment reached the memory, a bug since fixed).
  for path, d in jax.tree_util.tree_leaves_with_path(deltas[1]):
    desired = ref[path]
    np.testing.assert_allclose(d, desired, rtol=1e-4, atol=1e-3 * float(np.abs(desired).max()),
                               err_msg=jax.tree_util.keystr(path))
