"""Checkpoints: resuming equals never stopping, restores are elastic, damaged steps are skipped, divergence is safe.

- `loop.train` stopped at step M and rerun to N ends bit-for-bit where an uninterrupted N-step run ends, with the
  same logged losses (the data position is restored, not restarted).
- A state saved on 8 devices (data=2, fsdp=2, tensor=2) restores onto 4 devices and onto 1 with identical values
  and the new mesh's shardings.
- A step directory without Orbax's commit file, or a bare junk one, is moved aside with a warning and the
  latest complete step is restored.
- A diverging run raises NonFiniteLossError; every checkpoint left on disk is finite, and so is every logged loss.
"""
import glob
import json
import logging
import math
import os
import re
import shutil

import jax
import numpy as np
import pytest

from framework import checkpoint as ckpt_lib
from framework import config as config_lib
from framework import loop
from framework.mesh import make_sharder
from framework.train import Trainer

WORDS = ('alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau '
         'upsilon phi chi psi omega').split()


@pytest.fixture(scope='module')
def text_glob(tmp_path_factory) -> str:
  """A dozen small text files (~10 KB): both splits get plenty of 17-token windows at heldout_fraction 0.5."""
  root = tmp_path_factory.mktemp('text')
  rng = np.random.default_rng(0)
  for i in range(12):
    (root / f'doc{i:02d}.txt').write_text(' '.join(rng.choice(WORDS, size=150)) + '\n')
  return str(root / '*.txt')


def loop_config(text_glob: str, **overrides):
  cfg = config_lib.defaults()
  cfg.model.update(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=16, vocab_size=512)
  cfg.data.update(source='text', path=text_glob, heldout_fraction=0.5, seq_len=16, prefetch=1)
  cfg.train.update(steps=6, batch_size=8, log_every=1, eval_every=3, eval_batches=2)
  # 'constant' because a cosine or WSD schedule depends on train.steps, and the stopped run below is a run
  # with train.steps=M; a real preemption keeps train.steps and needs no such care.
  cfg.optim.update(lr=3e-3, schedule='constant', warmup_steps=2)
  cfg.mesh.update(data=-1, fsdp=2)
  cfg.checkpoint.update(every_steps=3, keep_last=5)
  cfg.metrics.update(peak_flops_per_device=1e12, tensorboard=False)  # skip the CPU matmul benchmark
  for dotted, value in overrides.items():
    section, key = dotted.split('__')
    cfg[section][key] = value
  return cfg


def read_metrics(workdir) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def restore(workdir, cfg, step=None, devices=None):
  trainer = Trainer(cfg, make_sharder(cfg, devices))
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, 'checkpoints'), cfg.checkpoint)
  try:
    step = checkpointer.latest_step() if step is None else step
    state, data_state = checkpointer.restore(step, trainer.abstract_state)
    return jax.device_get(state), data_state
  finally:
    checkpointer.close()


def assert_trees_equal(a, b):
  flat_b = dict(jax.tree_util.tree_leaves_with_path(b))
  for path, x in jax.tree_util.tree_leaves_with_path(a):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(flat_b[path]), err_msg=jax.tree_util.keystr(path))
  assert len(flat_b) == len(jax.tree.leaves(a))


# --- resume == never stopping --------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def straight_and_resumed(tmp_path_factory, text_glob):
  """An uninterrupted 6-step run and a run stopped at step 3 (train.steps=3) then rerun to 6 in its workdir."""
  straight = str(tmp_path_factory.mktemp('straight'))
  loop.train(loop_config(text_glob), straight)
  resumed = str(tmp_path_factory.mktemp('resumed'))
  loop.train(loop_config(text_glob, train__steps=3), resumed)
  stopped_steps = sorted(int(d) for d in os.listdir(os.path.join(resumed, 'checkpoints')) if d.isdigit())
  loop.train(loop_config(text_glob), resumed)
  return straight, resumed, stopped_steps


def test_resume_matches_uninterrupted_run(straight_and_resumed, text_glob):
  straight, resumed, stopped_steps = straight_and_resumed
  assert stopped_steps == [3]  # the first run really stopped at M
  cfg = loop_config(text_glob)
  a, data_a = restore(straight, cfg)
  b, data_b = restore(resumed, cfg)
  assert int(a.step) == int(b.step) == 6
  assert data_a['next_step'] == data_b['next_step'] == 6
  assert_trees_equal(b, a)  # params and optimizer state, bit for bit
  # The run moved after the stop, so the equality above covers the resumed steps.
  at_stop, _ = restore(resumed, cfg, step=3)
  assert max(float(np.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(at_stop.params))
             ) > 1e-3


def test_resume_restores_the_data_position(straight_and_resumed, text_glob):
  _, resumed, _ = straight_and_resumed
  _, data_state = restore(resumed, loop_config(text_glob), step=3)
  assert data_state['next_step'] == 3


def test_resumed_metrics_match(straight_and_resumed):
  straight, resumed, _ = straight_and_resumed
  a, b = read_metrics(straight), read_metrics(resumed)
  assert [r['step'] for r in a] == [r['step'] for r in b] == [1, 2, 3, 4, 5, 6]
  for ra, rb in zip(a, b):
    # Bitwise-equal states give bitwise-equal losses; a resume that restarted the data at step 0 would not.
    for key in ('loss', 'grad_norm', 'lr', 'tokens'):
      assert ra[key] == rb[key], (ra['step'], key)
  assert len({r['loss'] for r in a}) == 6  # every step saw a different batch
  evals = [(r['step'], r['eval_loss']) for r in a if 'eval_loss' in r]
  assert [s for s, _ in evals] == [3, 6]
  assert evals == [(r['step'], r['eval_loss']) for r in b if 'eval_loss' in r]
  assert evals[1][1] < evals[0][1]  # the model learns (held-out loss falls)


def test_rerun_at_the_end_does_nothing(straight_and_resumed, text_glob):
  straight, _, _ = straight_and_resumed
  before = read_metrics(straight)
  assert loop.train(loop_config(text_glob), straight) == {'step': 6}
  assert read_metrics(straight) == before


def test_resume_with_a_different_model_is_refused(straight_and_resumed, text_glob):
  straight, _, _ = straight_and_resumed
  with pytest.raises(ValueError, match=r'model\.d_ff'):
    loop.train(loop_config(text_glob, model__d_ff=256, train__steps=8), straight)


# --- elastic restore -----------------------------------------------------------------------------------------


def small_config(**mesh):
  cfg = config_lib.defaults()
  cfg.model.update(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=16, vocab_size=512)
  cfg.data.seq_len = 16
  cfg.train.batch_size = 8
  cfg.checkpoint.update(keep_last=5, async_save=True)
  cfg.mesh.update(**mesh)
  return cfg


@pytest.fixture(scope='module')
def saved_on_8(tmp_path_factory):
  """Checkpoints at steps 2 and 5 of a state with distinct random values in every leaf, saved on 8 devices."""
  cfg = small_config(data=2, fsdp=2, tensor=2)
  trainer = Trainer(cfg, make_sharder(cfg))
  rng = np.random.default_rng(0)
  directory = str(tmp_path_factory.mktemp('elastic') / 'checkpoints')
  checkpointer = ckpt_lib.Checkpointer(directory, cfg.checkpoint)
  states = {}
  for step in (2, 5):
    host = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype) if s.shape else np.asarray(step, s.dtype),
                        trainer.abstract_state)
    state = jax.device_put(host, trainer.state_shardings)
    assert not state.params['embedding'].sharding.is_fully_replicated
    checkpointer.save(step, state, {'next_step': step, 'seed': 0}, ckpt_lib.config_to_json(cfg), force=True)
    states[step] = host
  checkpointer.close()
  return directory, states


@pytest.mark.parametrize('n_devices,mesh,embedding_shard', [
    (4, dict(data=1, fsdp=2, tensor=2), (256, 32)),
    (1, dict(data=1), (512, 64)),
])
def test_restore_onto_fewer_devices(saved_on_8, n_devices, mesh, embedding_shard):
  directory, states = saved_on_8
  cfg = small_config(**mesh)
  trainer = Trainer(cfg, make_sharder(cfg, jax.devices()[:n_devices]))
  checkpointer = ckpt_lib.Checkpointer(directory, cfg.checkpoint)
  try:
    assert checkpointer.all_steps() == [2, 5]
    state, data_state = checkpointer.restore(5, trainer.abstract_state)
  finally:
    checkpointer.close()
  assert data_state['next_step'] == 5
  assert_trees_equal(jax.device_get(state), states[5])
  for x, sharding in zip(jax.tree.leaves(state), jax.tree.leaves(trainer.state_shardings)):
    assert x.sharding.is_equivalent_to(sharding, x.ndim)
    assert {d.id for d in x.sharding.device_set} == {d.id for d in jax.devices()[:n_devices]}
  assert state.params['embedding'].addressable_shards[0].data.shape == embedding_shard


# --- incomplete checkpoints ----------------------------------------------------------------------------------


class _Records(logging.Handler):

  def __init__(self):
    super().__init__(logging.WARNING)
    self.messages = []

  def emit(self, record):
    self.messages.append(record.getMessage())


@pytest.mark.parametrize('damage', ['no_commit_file', 'no_state_metadata', 'bare_junk'])
def test_incomplete_step_is_moved_aside(saved_on_8, tmp_path, damage):
  source, states = saved_on_8
  directory = str(tmp_path / 'checkpoints')
  shutil.copytree(source, directory)
  bad = os.path.join(directory, '7' if damage != 'bare_junk' else '999')
  if damage == 'bare_junk':
    os.makedirs(bad)
    with open(os.path.join(bad, 'junk'), 'w', encoding='utf-8') as f:
      f.write('not a checkpoint')
  else:
    shutil.copytree(os.path.join(directory, '5'), bad)  # a later step, then damaged
    os.remove(os.path.join(bad, '_CHECKPOINT_METADATA' if damage == 'no_commit_file' else 'state/_METADATA'))

  # absl logs through the 'absl' Python logger; a handler on it sees the warning whatever pytest captures.
  records = _Records()
  logging.getLogger('absl').addHandler(records)
  try:
    cfg = small_config(data=1)
    checkpointer = ckpt_lib.Checkpointer(directory, cfg.checkpoint)
    try:
      latest = checkpointer.latest_step()
      state, _ = checkpointer.restore(latest, Trainer(cfg, make_sharder(cfg, jax.devices()[:1])).abstract_state)
    finally:
      checkpointer.close()
  finally:
    logging.getLogger('absl').removeHandler(records)

  assert latest == 5
  assert_trees_equal(jax.device_get(state), states[5])
  name = os.path.basename(bad)
  assert not os.path.exists(bad)
  assert len(glob.glob(os.path.join(directory, f'incomplete-{name}-*'))) == 1
  assert any('incomplete' in m and bad in m for m in records.messages), records.messages


# --- divergence ----------------------------------------------------------------------------------------------


def test_non_finite_loss_stops_and_keeps_good_checkpoints(tmp_path, text_glob):
  cfg = loop_config(text_glob, train__steps=8, train__eval_every=0, optim__lr=1e9, optim__grad_clip=0.0,
                    optim__warmup_steps=0, checkpoint__every_steps=1, checkpoint__keep_last=10)
  workdir = str(tmp_path / 'run')
  with pytest.raises(loop.NonFiniteLossError) as info:
    loop.train(cfg, workdir)
  bad_step = int(re.search(r'at step (\d+)', str(info.value)).group(1))
  steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')) if d.isdigit())
  # The setup really diverges, but not at once: some good steps were saved, never the bad one.
  assert 1 < bad_step <= 8
  assert steps == list(range(1, bad_step)), (steps, bad_step)
  assert f'step {bad_step - 1}' in str(info.value)  # the message names the checkpoint to resume from
  for step in steps:
    state, _ = restore(workdir, cfg, step=step)
    for path, x in jax.tree_util.tree_leaves_with_path(state):
      assert np.all(np.isfinite(x)), (step, jax.tree_util.keystr(path))
  # lr=1e9 really blew the parameters up: the kept states are finite, not small.
  assert math.sqrt(sum(float(np.sum(np.square(x, dtype=np.float64))) for x in jax.tree.leaves(state.params))) > 1e6
  records = read_metrics(workdir)
  assert [r['step'] for r in records] == steps
  assert all(isinstance(r['loss'], float) and math.isfinite(r['loss']) for r in records)


def test_metrics_logged_after_the_last_checkpoint_are_dropped_on_resume(tmp_path):
  """A crash between a log line and the next checkpoint must not leave the redone steps twice in the file."""
  from framework import metrics as metrics_lib
  path = tmp_path / 'metrics.jsonl'
  path.write_text(''.join(f'{{"step": {s}, "loss": {1.0 / s}}}\n' for s in (2, 4, 6, 8)))
  writer = metrics_lib.MetricsWriter(str(tmp_path), tensorboard=False, resume_step=4)
  writer.write(6, {'loss': 0.5})
  writer.close()
  steps = [json.loads(line)['step'] for line in path.read_text().splitlines()]
  assert steps == [2, 4, 6]
