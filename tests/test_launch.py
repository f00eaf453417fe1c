"""End to end through the launcher: `python -m launch.train` trains, logs, checkpoints, and resumes on rerun.

Runs in a subprocess on 4 fake CPU devices (mesh data=2 x fsdp=2) so the flags, the absl entry point and the
device setup are exercised exactly as a user runs them.
"""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from framework import config as config_lib
from configs import lm_tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

OVERRIDES = {
    'train.steps': 6, 'train.log_every': 2, 'data.seq_len': 32, 'train.batch_size': 8,
    'data.max_corpus_bytes': 300000, 'checkpoint.every_steps': 3, 'mesh.fsdp': 2,
}
# Needed on top of OVERRIDES, see test_short_run_keeps_the_configs_warmup: lm_tiny warms up for 30 steps, and
# 300 KB of the embedded corpus is 13 files, none of which the default 5% hash split holds out.
WORKAROUNDS = {'optim.warmup_steps': 2, 'data.heldout_fraction': 0.2}


def launch(workdir, **changes):
  flags = {**OVERRIDES, **WORKAROUNDS, **changes}
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # the parent's 8-device flag is not ours
  env['JAX_PLATFORMS'] = 'cpu'
  cmd = [sys.executable, '-m', 'launch.train', '--config=configs/lm_tiny.py', f'--workdir={workdir}',
         '--cpu_devices=4'] + [f'--config.{k}={v}' for k, v in flags.items()]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def first_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('launch') / 'run')
  return workdir, launch(workdir)


def test_launch_trains_logs_and_checkpoints(first_run):
  workdir, proc = first_run
  records = read_metrics(workdir)
  assert [r['step'] for r in records] == [2, 4, 6]
  for r in records:
    assert isinstance(r['loss'], float) and 0 < r['loss'] < 20, r
  assert 'eval_loss' in records[-1]  # the last step always evaluates
  assert glob.glob(os.path.join(workdir, 'tensorboard', 'events.out.tfevents.*'))
  for step in (3, 6):
    assert os.path.exists(os.path.join(workdir, 'checkpoints', str(step), '_CHECKPOINT_METADATA')), step
  with open(os.path.join(workdir, 'config.json'), encoding='utf-8') as f:
    assert json.load(f)['mesh']['fsdp'] == 2  # the override reached the run
  assert "'data': 2, 'fsdp': 2" in proc.stderr  # on the 4 devices asked for


def test_rerun_resumes_from_the_checkpoint(first_run):
  workdir, _ = first_run
  proc = launch(workdir, **{'train.steps': 8})
  assert 'data position: step 6' in proc.stderr
  assert [r['step'] for r in read_metrics(workdir)] == [2, 4, 6, 8]  # step 8 appended, nothing retrained
  assert os.path.exists(os.path.join(workdir, 'checkpoints', '8', '_CHECKPOINT_METADATA'))


def test_short_run_keeps_the_configs_warmup():
  cfg = lm_tiny.get_config()
  for dotted, value in {**OVERRIDES, 'data.heldout_fraction': 0.2}.items():
    section, key = dotted.split('.')
    cfg[section][key] = value
  config_lib.validate(cfg, num_devices=4)


def test_sigterm_saves_the_current_step_and_exits_cleanly(tmp_path):
  """Preemption: SIGTERM mid-run checkpoints the step it reached and exits cleanly (rerunning resumes: test_checkpoint)."""
  workdir = str(tmp_path / 'run')
  args = [sys.executable, '-m', 'launch.train', '--config=configs/lm_tiny.py', f'--workdir={workdir}',
          '--cpu_devices=2'] + [f'--config.{k}={v}' for k, v in {
              **OVERRIDES, 'train.steps': 2000, 'train.log_every': 1, 'checkpoint.every_steps': 1000,
              'data.heldout_fraction': 0.2, 'optim.warmup_steps': 2}.items()]
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env['JAX_PLATFORMS'] = 'cpu'
  proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = os.path.join(workdir, 'metrics.jsonl')
  deadline = time.time() + 240
  while (time.time() < deadline and proc.poll() is None
         and not (os.path.exists(metrics) and len(open(metrics).readlines()) >= 3)):
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  saved = [int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints')) if s.isdigit()]
  assert len(saved) == 1 and 3 <= saved[0] < 2000, err[-3000:]
  assert 'Stopping at step' in err
  last_logged = read_metrics(workdir)[-1]['step']
  assert last_logged == saved[0]
