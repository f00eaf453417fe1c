"""SIGKILL at ten moments, several inside an asynchronous save: every restart resumes from the newest complete
checkpoint, and the run ends bit for bit where an uninterrupted one ends (slow: about 2 minutes on 2 CPU cores).

`python -m launch.train` runs in a subprocess on 2 fake CPU devices (fsdp=2), with a ~4.5M-parameter model
(vocab 16384) whose ~54 MB train state takes Orbax a good fraction of a second to write. The test picks each
moment by watching the run's files (never by sleeping): just after the first log line, when a save's tmp
directory appears, while its arrays are being written, once an item inside it is committed, right after a step
is committed, in the middle of a step, right after a save step is logged. A kill counts as "inside a save" when
an Orbax N.orbax-checkpoint-tmp directory is left on disk after the process died: it died between Orbax creating
that directory and renaming it into place.

The reference is an uninterrupted run with the same flags and mesh. Every metrics record any run leaves behind
must equal the reference's record for that step (timings aside), the final metrics.jsonl holds each step once,
and the final checkpoints hold the reference's train state bit for bit.
"""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, EVERY, KEEP_LAST = 15, 3, 2
TMP = '.orbax-checkpoint-tmp'
ITEMS = ('state', 'data', 'config')
FLAGS = {
    'model.d_model': 128, 'model.n_layers': 2, 'model.n_heads': 4, 'model.n_kv_heads': 2, 'model.d_ff': 256,
    'model.max_seq_len': 32, 'model.vocab_size': 16384, 'data.source': 'text', 'data.heldout_fraction': 0.2,
    'data.seq_len': 32, 'train.batch_size': 8, 'train.steps': STEPS, 'train.log_every': 1, 'train.eval_every': 5,
    'train.eval_batches': 1, 'optim.warmup_steps': 2, 'optim.schedule': 'constant',
    'checkpoint.every_steps': EVERY, 'checkpoint.async_save': True, 'mesh.data': 1, 'mesh.fsdp': 2,
    'metrics.tensorboard': False, 'metrics.peak_flops_per_device': 1e12,
}
WORDS = ('alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau '
         'upsilon phi chi psi omega').split()


def _launch(workdir: str, text_glob: str, cache: str, keep_last: int) -> tuple[subprocess.Popen, str]:
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # the parent's 8-device flag is not ours
  # Each run would otherwise spend most of its time compiling; a cached executable is the same program.
  env.update(JAX_PLATFORMS='cpu', JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='-1')
  flags = {**FLAGS, 'data.path': text_glob, 'checkpoint.keep_last': keep_last}
  cmd = [sys.executable, '-m', 'launch.train', '--config=configs/lm_tiny.py', f'--workdir={workdir}',
         '--cpu_devices=2'] + [f'--config.{k}={v}' for k, v in flags.items()]
  log = os.path.join(os.path.dirname(workdir), f'log-{time.time_ns()}.txt')
  with open(log, 'w', encoding='utf-8') as out:  # a file, not a pipe: a full pipe would stall the run
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT), log


def _records(workdir: str) -> list[dict]:
  try:
    with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
      return [json.loads(line) for line in f if line.endswith('\n')]  # a line being written is not yet a record
  except FileNotFoundError:
    return []


def _deterministic(record: dict) -> dict:
  return {k: v for k, v in record.items() if not any(t in k for t in ('per_s', 'mfu', 'time'))}


def _listdir(path: str) -> list[str]:
  try:
    return os.listdir(path)
  except FileNotFoundError:  # not created yet, or renamed away while we looked
    return []


class _Watch:
  """What a run has written since it started: checkpoint entries that are new (by inode and change time, so a
  tmp directory Orbax removed and made again counts as new), and metrics steps past any logged before."""

  def __init__(self, workdir: str):
    self.ckpt = os.path.join(workdir, 'checkpoints')
    self.workdir = workdir
    self._old = self._entries()
    self.logged_before = max((r['step'] for r in _records(workdir)), default=0)

  def _entries(self) -> set:
    found = set()
    for name in _listdir(self.ckpt):
      try:
        st = os.stat(os.path.join(self.ckpt, name))
      except FileNotFoundError:
        continue
      found.add((name, st.st_ino, st.st_ctime_ns))
    return found

  def new_names(self) -> list[str]:
    return [name for name, _, _ in self._entries() - self._old]

  def new_tmp(self) -> list[str]:
    return [os.path.join(self.ckpt, n) for n in self.new_names() if TMP in n]

  def new_steps(self) -> list[int]:
    return [r['step'] for r in _records(self.workdir) if r['step'] > self.logged_before]


def _array_bytes_written(tmp: str) -> bool:
  """Some array data (an OCDBT data file, under a 'd' directory) of the state item is on disk."""
  return any(os.path.basename(root) == 'd' and files for root, _, files in os.walk(os.path.join(tmp, 'state' + TMP)))


# Each moment: a test on what the run has newly written, true once the moment has come.
MOMENTS = {
    'first_log': lambda w: bool(w.new_steps()),
    'mid_step': lambda w: any(s % EVERY for s in w.new_steps()),
    'save_step_logged': lambda w: any(s % EVERY == 0 for s in w.new_steps()),
    'tmp_created': lambda w: bool(w.new_tmp()),
    'array_bytes': lambda w: any(_array_bytes_written(t) for t in w.new_tmp()),
    'item_committed': lambda w: any(set(_listdir(t)) & set(ITEMS) for t in w.new_tmp()),
    'step_committed': lambda w: any(n.isdigit() for n in w.new_names()),
}
PLAN = ('first_log', 'tmp_created', 'array_bytes', 'item_committed', 'step_committed', 'mid_step',
        'save_step_logged', 'tmp_created', 'step_committed', 'array_bytes')


def _newest_committed(ckpt: str) -> int | None:
  """Orbax's own rule on a local disk: a step directory is committed once it carries its final (renamed) name."""
  return max((int(n) for n in _listdir(ckpt) if n.isdigit()), default=None)


def _resumed_from(log: str, ckpt: str) -> int | None:
  with open(log, encoding='utf-8') as f:
    text = f.read()
  marker = f'Resumed from {ckpt}/'
  if marker not in text:
    return None
  return int(text.split(marker, 1)[1].split()[0])


def _load_state(step_dir: str) -> dict:
  """The saved train state as host arrays, read through Orbax's metadata alone (no model code)."""
  checkpointer = ocp.PyTreeCheckpointer()
  path = os.path.join(step_dir, 'state')
  tree = checkpointer.metadata(path).item_metadata.tree
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  state = checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(state)}


def _record_problems(records: list[dict], reference: dict[int, dict], upto: int) -> list[str]:
  """Each of steps 1..upto logged once, in order, each record the reference's (timings aside)."""
  steps = [r['step'] for r in records]
  if steps != list(range(1, upto + 1)):
    return [f'logged steps {steps}']
  return [f'step {r["step"]} differs: {r} vs {reference[r["step"]]}' for r in records
          if _deterministic(r) != _deterministic(reference[r['step']])]


@pytest.mark.slow
def test_sigkill_at_ten_moments_resumes_bit_exact(tmp_path):
  text = tmp_path / 'text'
  text.mkdir()
  rng = np.random.default_rng(0)
  for i in range(12):
    (text / f'doc{i:02d}.txt').write_text(' '.join(rng.choice(WORDS, size=300)) + '\n')
  text_glob, cache = str(text / '*.txt'), str(tmp_path / 'jax-cache')

  ref_dir = str(tmp_path / 'reference')
  proc, log = _launch(ref_dir, text_glob, cache, keep_last=100)  # keeps every step, to compare with
  assert proc.wait(timeout=600) == 0, open(log, encoding='utf-8').read()[-4000:]
  reference = {r['step']: r for r in _records(ref_dir)}
  assert sorted(reference) == list(range(1, STEPS + 1))

  workdir = str(tmp_path / 'crashed')
  ckpt = os.path.join(workdir, 'checkpoints')
  expected_resume, exact, inside, summary = None, 0, 0, []
  for i, moment in enumerate(PLAN + ('(none: runs to the end)',)):
    watch = _Watch(workdir)
    proc, log = _launch(workdir, text_glob, cache, keep_last=KEEP_LAST)
    if moment in MOMENTS:
      deadline = time.monotonic() + 300
      while not MOMENTS[moment](watch):
        assert proc.poll() is None, f'run {i} ended before the moment {moment!r}:\n' + open(log).read()[-4000:]
        assert time.monotonic() < deadline, f'run {i}: no moment {moment!r}'
        time.sleep(0.002)
      proc.send_signal(signal.SIGKILL)
      assert proc.wait(timeout=60) == -signal.SIGKILL
    else:
      assert proc.wait(timeout=600) == 0, open(log, encoding='utf-8').read()[-4000:]

    # What the disk says now, independently of framework.checkpoint: the step the next run must resume from,
    # and whether the process died with a save in flight.
    resumed = _resumed_from(log, ckpt)
    tmp_left = sorted(os.path.basename(t) for t in watch.new_tmp())  # made by this run, not an older leftover
    records = _records(workdir)
    problems = _record_problems(records, reference, max((r['step'] for r in records), default=0))
    if resumed != expected_resume:
      problems.append(f'resumed from {resumed}, expected {expected_resume}')
    if i:  # a restart: from the newest committed step, and every step it logged on the reference's trajectory
      exact += not problems
    else:
      first_run_problems = problems
    inside += bool(tmp_left)
    summary.append(f'run {i:2d}: resumed from {resumed}, killed at {moment}, left {tmp_left or "no tmp"}, '
                   f'logged up to {records[-1]["step"] if records else 0}; {problems or "exact"}')
    expected_resume = _newest_committed(ckpt)

  print('\n'.join(summary))
  print(f'{exact}/{len(PLAN)} bit-exact resumes, {inside} kills inside a save')
  assert exact == len(PLAN) and not first_run_problems, '\n'.join(summary)
  assert inside >= 4, '\n'.join(summary)  # tmp_created and array_bytes, twice each, have hundreds of ms to land in
  assert not _record_problems(_records(workdir), reference, STEPS)
  kept = sorted(int(n) for n in _listdir(ckpt) if n.isdigit())
  assert kept == [STEPS - EVERY, STEPS] and not [n for n in _listdir(ckpt) if TMP in n], _listdir(ckpt)
  for step in kept:
    ours, theirs = _load_state(os.path.join(ckpt, str(step))), _load_state(os.path.join(ref_dir, 'checkpoints',
                                                                                       str(step)))
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
      np.testing.assert_array_equal(ours[key], value, err_msg=f'step {step} {key}')
