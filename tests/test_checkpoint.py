"""Checkpoints: resuming equals never stopping, restores are elastic, damaged steps are skipped, divergence is safe.

- `loop.train` stopped at step M and rerun to N ends bit-for-bit where an uninterrupted N-step run ends, with the
  same logged losses (the data position is restored, not restarted).
- A state saved on 8 devices (data=2, fsdp=2, tensor=2) restores onto 4 devices and onto 1 with identical values
  and the new mesh's shardings.
- A step directory Orbax did not finish (no commit_success.txt, an unfinished rename, a missing item), or a bare
  junk one, is moved aside with a warning; a leftover N.orbax-checkpoint-tmp is never taken for step N; the latest
  complete step is restored. A finished in-place (commit-file) step counts as complete.
- Retention keeps exactly the newest keep_last steps plus every keep_every-th; train() returns only after its
  last asynchronous save is committed on disk.
- A diverging run raises NonFiniteLossError; every checkpoint left on disk is finite, and so is every logged loss.
"""
import asyncio
import glob
import json
import logging
import math
import os
import re
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
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


def test_resume_with_another_batch_size_continues_at_the_example_offset(straight_and_resumed, text_glob, tmp_path,
                                                                        caplog):
  _, resumed, _ = straight_and_resumed
  workdir = tmp_path / 'bigger'
  shutil.copytree(os.path.join(resumed, 'checkpoints', '3'), workdir / 'checkpoints' / '3')
  with caplog.at_level(logging.WARNING, logger='absl'):
    loop.train(loop_config(text_glob, train__batch_size=16, train__steps=4), str(workdir))
  # 3 steps of 8 examples, then one of 16 from example 24 (not from 3 x 16 = 48, which would skip 24 examples).
  assert any('resuming at example 24' in r.getMessage() for r in caplog.records)
  _, data_state = restore(str(workdir), loop_config(text_glob, train__batch_size=16), step=4)
  assert data_state['next_step'] == 4 and data_state['next_example'] == 24 + 16


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
  assert loop.train(loop_config(text_glob), straight) == {'step': 6, 'examples': 48}
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


def _commit_file_save(directory: str, step: int, host_state, data_state: dict) -> str:
  """Step `step` written by Orbax itself the way it writes where rename is not atomic: in place, no tmp name,
  commit_success.txt last (CommitFileTemporaryPath)."""
  options = ocp.CheckpointManagerOptions(create=True, atomicity_options=ocp.options.AtomicityOptions(
      mode=ocp.options.AtomicityMode.COMMIT_FILE))
  manager = ocp.CheckpointManager(directory, options=options, item_names=ckpt_lib.ITEMS)
  manager.save(step, force=True, args=ocp.args.Composite(state=ocp.args.StandardSave(host_state),
                                                         data=ocp.args.JsonSave(data_state),
                                                         config=ocp.args.JsonSave({})))
  manager.close()
  path = os.path.join(directory, str(step))
  assert not glob.glob(path + '.orbax-checkpoint-tmp*')
  return path


def _damage(directory: str, damage: str, states) -> str:
  """Leaves step 7 (or junk 999) as a crash or an accident would, next to the complete steps 2 and 5."""
  five, seven = os.path.join(directory, '5'), os.path.join(directory, '7')
  if damage == 'bare_junk':
    os.makedirs(os.path.join(directory, '999'))
    with open(os.path.join(directory, '999', 'junk'), 'w', encoding='utf-8') as f:
      f.write('not a checkpoint')
    return os.path.join(directory, '999')
  if damage == 'in_place_no_marker':  # an in-place write cut off before its last file
    os.remove(os.path.join(_commit_file_save(directory, 7, states[5], {'next_step': 5, 'seed': 0}),
                           'commit_success.txt'))
    return seven
  if damage == 'tmp_dir':  # killed between Orbax's marker and its rename: complete, but never renamed
    shutil.copytree(five, seven + '.orbax-checkpoint-tmp')
    return seven + '.orbax-checkpoint-tmp'
  shutil.copytree(five, seven)
  if damage == 'unfinished_rename':  # a copy-then-delete rename cut off: the source is still there
    shutil.copytree(os.path.join(five, 'state'), os.path.join(seven + '.orbax-checkpoint-tmp', 'state'))
  elif damage == 'no_state_metadata':
    os.remove(os.path.join(seven, 'state', '_METADATA'))
  elif damage == 'missing_item':
    shutil.rmtree(os.path.join(seven, 'data'))
  return seven


@pytest.mark.parametrize('damage', ['in_place_no_marker', 'unfinished_rename', 'no_state_metadata', 'missing_item',
                                    'bare_junk', 'tmp_dir'])
def test_incomplete_step_is_never_listed_or_restored(saved_on_8, tmp_path, damage):
  source, states = saved_on_8
  directory = str(tmp_path / 'checkpoints')
  shutil.copytree(source, directory)
  bad = _damage(directory, damage, states)

  # absl logs through the 'absl' Python logger; a handler on it sees the warning whatever pytest captures.
  records = _Records()
  logging.getLogger('absl').addHandler(records)
  try:
    cfg = small_config(data=1)
    abstract = Trainer(cfg, make_sharder(cfg, jax.devices()[:1])).abstract_state
    checkpointer = ckpt_lib.Checkpointer(directory, cfg.checkpoint)
    try:
      assert checkpointer.all_steps() == [2, 5] and checkpointer.latest_step() == 5
      state, _ = checkpointer.restore(5, abstract)
      with pytest.raises(ValueError, match='incomplete'):
        checkpointer.restore(7, abstract)
    finally:
      checkpointer.close()
  finally:
    logging.getLogger('absl').removeHandler(records)

  assert_trees_equal(jax.device_get(state), states[5])
  quarantined = glob.glob(os.path.join(f'{directory}-incomplete', '*'))
  if damage == 'tmp_dir':  # not a step at all: left to Orbax's tmp cleanup, never moved aside
    assert quarantined == []
  else:
    assert not os.path.exists(bad)
    assert quarantined == glob.glob(os.path.join(f'{directory}-incomplete', f'{os.path.basename(bad)}-*'))
    assert len(quarantined) == 1
    assert any('incomplete' in m and bad in m for m in records.messages), records.messages


def test_complete_in_place_step_is_restored(saved_on_8, tmp_path):
  """The other half of the rule above: Orbax's commit-file protocol, finished, counts as complete."""
  source, states = saved_on_8
  directory = str(tmp_path / 'checkpoints')
  shutil.copytree(source, directory)
  _commit_file_save(directory, 7, states[2], {'next_step': 2, 'seed': 0})
  cfg = small_config(data=1)
  checkpointer = ckpt_lib.Checkpointer(directory, cfg.checkpoint)
  try:
    assert checkpointer.all_steps() == [2, 5, 7]
    state, _ = checkpointer.restore(7, Trainer(cfg, make_sharder(cfg, jax.devices()[:1])).abstract_state)
  finally:
    checkpointer.close()
  assert_trees_equal(jax.device_get(state), states[2])


def test_leftover_tmp_directory_is_cleaned_up(saved_on_8, tmp_path):
  source, states = saved_on_8
  directory = str(tmp_path / 'checkpoints')
  shutil.copytree(source, directory)
  tmp = _damage(directory, 'tmp_dir', states)
  cfg = small_config(data=1)
  checkpointer = ckpt_lib.Checkpointer(directory, cfg.checkpoint)
  try:
    # A save of another step: only the cleanup of unfinished saves (which the save waits for) removes step 7's.
    checkpointer.save(8, states[2], {'next_step': 2, 'seed': 0}, {}, force=True)
  finally:
    checkpointer.close()
  assert not os.path.exists(tmp)
  assert sorted(os.listdir(directory)) == ['2', '5', '8']


# --- retention and commit --------------------------------------------------------------------------------------


@pytest.mark.parametrize('steps,every,keep_last,keep_every', [(10, 1, 3, 0), (12, 1, 3, 5), (11, 2, 2, 4)])
def test_retention(tmp_path, steps, every, keep_last, keep_every):
  cfg = small_config()
  cfg.checkpoint.update(keep_last=keep_last, keep_every=keep_every)
  directory = str(tmp_path / 'checkpoints')
  saved = [s for s in range(1, steps + 1) if s % every == 0 or s == steps]  # loop.train's save points
  checkpointer = ckpt_lib.Checkpointer(directory, cfg.checkpoint)
  try:
    for step in saved:
      checkpointer.save(step, {'w': np.full((4,), step, np.float32)}, {'next_step': step}, {}, force=True)
  finally:
    checkpointer.close()
  # The newest keep_last saves, and every multiple of keep_every whether or not it is among them.
  expected = set(saved[-keep_last:]) | {s for s in saved if keep_every and s % keep_every == 0}
  on_disk = {int(n) for n in os.listdir(directory) if n.isdigit()}
  assert on_disk == expected, (sorted(on_disk), sorted(expected))
  assert len(expected) > keep_last or not keep_every  # the keep_every cases really keep extra steps
  assert not glob.glob(os.path.join(directory, '*.orbax-checkpoint-tmp*'))


def test_train_returns_after_the_last_save_is_committed(tmp_path, text_glob, monkeypatch):
  """With Orbax's commit held back a second, the final step must still be complete when train() returns."""
  original = ocp.path.atomicity.AtomicRenameTemporaryPath.finalize
  finalized = []

  async def slow_finalize(self):
    await asyncio.sleep(1.0)
    await original(self)
    finalized.append(os.path.basename(str(self.get_final())))

  monkeypatch.setattr(ocp.path.atomicity.AtomicRenameTemporaryPath, 'finalize', slow_finalize)
  workdir = str(tmp_path / 'run')
  cfg = loop_config(text_glob, train__steps=3, train__eval_every=0, checkpoint__async_save=True)
  loop.train(cfg, workdir)
  final = os.path.join(workdir, 'checkpoints', '3')
  assert '3' in finalized  # the step's own commit ran through the slowed path...
  # ...and was on disk before train() returned: renamed into place, with Orbax's marker.
  assert os.listdir(os.path.join(workdir, 'checkpoints')) == ['3']
  assert os.path.isfile(os.path.join(final, 'commit_success.txt'))
  assert os.path.isfile(os.path.join(final, 'state', '_METADATA'))


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
