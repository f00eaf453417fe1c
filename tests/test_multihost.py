"""Two local processes (4 fake CPU devices each, gloo collectives) train like one process with 8 devices.

Covers jax.distributed start-up, per-process data feeding (including tensor parallelism across processes,
where both processes must feed the same rows), and checkpointing by every process into one directory.
A missing peer makes jax abort after the timeout, so every process runs under one.
"""
import json
import os
import subprocess
import sys

import pytest

from ports import free_port

SCRIPT = r'''
import json, sys
from absl import logging
import jax
mode, workdir, port, pid, nproc = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
jax.config.update('jax_platforms', 'cpu')
jax.config.update('jax_num_cpu_devices', 8 // nproc)
from framework import config, distributed, loop
if nproc > 1:
  distributed.initialize(coordinator_address=f'127.0.0.1:{port}', num_processes=nproc, process_id=pid,
                         timeout_s=120 if mode != 'alone' else 8, heartbeat_timeout_s=10)
cfg = config.defaults()
cfg.model.update(d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=128, max_seq_len=64)
cfg.data.update(seq_len=32, max_corpus_bytes=1_500_000, heldout_fraction=0.2)
cfg.train.update(steps=4, batch_size=16, log_every=2, eval_every=4, eval_batches=1)
cfg.optim.update(warmup_steps=0, schedule='constant')
cfg.checkpoint.update(every_steps=2)
if mode.startswith('preempt'):  # long enough to be interrupted; steps=N: a run to exactly N steps
  steps = int(mode.split('=')[1]) if '=' in mode else 10_000
  cfg.train.update(steps=steps, log_every=1, eval_every=0)
  cfg.checkpoint.update(every_steps=100_000)
cfg.metrics.peak_flops_per_device = 1e9
if mode == 'mismatch' and pid == 1:
  cfg.data.max_corpus_bytes = 1_400_000  # this host reads less of the corpus: a different stream
if mode in ('data', 'mismatch', 'alone') or mode.startswith('preempt'):
  cfg.mesh.update(data=-1, dcn_data=nproc)
elif nproc == 4:  # tensor parallel across one pair of processes, the batch split across the other
  cfg.mesh.update(data=-1, dcn_data=2, dcn_tensor=2)
else:
  cfg.mesh.update(data=-1, tensor=2, dcn_tensor=nproc)
out = loop.train(cfg, workdir)
print('RESULT', json.dumps({k: float(out[k]) for k in ('step', 'loss', 'grad_norm', 'param_norm') if k in out}))
'''


def _start(mode: str, workdir, nproc: int, extra_env=None) -> list[subprocess.Popen]:
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_PLATFORMS')}
  env.update(extra_env or {})
  port = str(free_port())
  return [subprocess.Popen([sys.executable, '-c', SCRIPT, mode, str(workdir), port, str(i), str(nproc)], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(nproc)]


def _finish(procs) -> list[tuple[int, str, str]]:
  try:
    outputs = [p.communicate(timeout=300) for p in procs]
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]
  finally:
    for p in procs:
      p.kill()


def _run(mode: str, workdir, nproc: int, extra_env=None) -> list[dict]:
  results = []
  for returncode, out, err in _finish(_start(mode, workdir, nproc, extra_env)):
    assert returncode == 0, err[-3000:]
    results.append(json.loads(out.split('RESULT', 1)[1]))
  return results


# 'data' and 4 processes run with -m slow (the default suite's time budget); 'tensor_across_processes' also
# splits the batch between the processes, and adds tensor parallelism across them.
@pytest.mark.parametrize('mode, nproc', [pytest.param('data', 2, marks=pytest.mark.slow), ('tensor_across_processes', 2),
                                         pytest.param('data', 4, marks=pytest.mark.slow),
                                         pytest.param('tensor_across_processes', 4, marks=pytest.mark.slow)])
def test_processes_match_one(mode, nproc, tmp_path):
  single = _run(mode, tmp_path / 'one', 1)[0]
  several = _run(mode, tmp_path / 'several', nproc)
  for result in several:
    for key, value in single.items():
      assert result[key] == pytest.approx(value, rel=1e-4), key
  assert sorted(os.listdir(tmp_path / 'several' / 'checkpoints')) == ['2', '4']


def test_processes_reading_different_data_all_stop(tmp_path):
  """Process 1 reads a different slice of the corpus: both processes refuse, naming the field, before training."""
  for returncode, out, err in _finish(_start('mismatch', tmp_path / 'run', 2)):
    assert returncode != 0 and 'RESULT' not in out
    assert 'processes [1] read a different data stream than process 0' in err, err[-3000:]
    assert 'packed stream fingerprint' in err and 'data.max_corpus_bytes' in err
  assert not (tmp_path / 'run' / 'checkpoints').exists() or not os.listdir(tmp_path / 'run' / 'checkpoints')


@pytest.mark.slow
@pytest.mark.parametrize('nproc', [2, 4])
def test_sigterm_to_one_process_saves_one_step_on_all_and_resumes(nproc, tmp_path):
  """SIGTERM to process 1 only: all processes stop at the same step, one checkpoint of it is saved, all exit 0;
  rerunning resumes there, and the resumed run ends where an uninterrupted run of as many steps does."""
  import signal
  import time
  workdir = tmp_path / 'run'
  procs = _start('preempt', workdir, nproc)
  metrics = workdir / 'metrics.jsonl'
  deadline = time.monotonic() + 240
  while time.monotonic() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
    time.sleep(0.2)
  procs[1].send_signal(signal.SIGTERM)
  finished = _finish(procs)
  for i, (returncode, _, err) in enumerate(finished):
    assert returncode == 0, err[-3000:]
    assert f'[process {i}/{nproc}] Stopping at step' in err, err[-3000:]  # every log line names its process
  stopped = [json.loads(out.split('RESULT', 1)[1])['step'] for _, out, _ in finished]
  assert len(set(stopped)) == 1 and 3 <= stopped[0] < 10_000, stopped
  step = int(stopped[0])
  assert os.listdir(workdir / 'checkpoints') == [str(step)]
  resumed = _run(f'preempt={step + 3}', workdir, nproc)
  straight = _run(f'preempt={step + 3}', tmp_path / 'straight', nproc)
  for a, b in zip(resumed, straight):
    assert a['step'] == b['step'] == step + 3
    for key in ('loss', 'grad_norm', 'param_norm'):
      assert a[key] == pytest.approx(b[key], rel=1e-5), key


@pytest.mark.slow
@pytest.mark.parametrize('nproc', [2, 4])
def test_a_peer_that_never_arrives_fails_clearly_within_the_timeout(nproc, tmp_path):
  """All processes but the last start: each fails in one line within its timeout (8 s here)."""
  import time
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_PLATFORMS')}
  port = str(free_port())
  start = time.monotonic()
  procs = [subprocess.Popen([sys.executable, '-c', SCRIPT, 'alone', str(tmp_path / 'run'), port, str(i), str(nproc)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(nproc - 1)]
  for i, (returncode, _, err) in enumerate(_finish(procs)):
    assert returncode != 0 and time.monotonic() - start < 60
    assert f'error: process {i} of {nproc}: not every process of the job joined 127.0.0.1:' in err, err[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize('nproc', [2, 4])
def test_a_peer_killed_mid_run_stops_the_others_with_an_error(nproc, tmp_path):
  """kill -9 of process 1 while training: process 0 stops within the heartbeat timeout (10 s here), naming it."""
  import time
  procs = _start('preempt', tmp_path / 'run', nproc)
  metrics = tmp_path / 'run' / 'metrics.jsonl'
  deadline = time.monotonic() + 240
  while time.monotonic() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
    time.sleep(0.2)
  killed = time.monotonic()
  procs[1].kill()
  try:
    _, err = procs[0].communicate(timeout=90)
  finally:
    for p in procs:
      p.kill()
  assert procs[0].returncode != 0 and time.monotonic() - killed < 60
  assert 'Task 1 heartbeat timeout' in err or 'stopped sending heartbeats' in err, err[-3000:]


@pytest.mark.slow
def test_two_processes_share_a_remote_workdir(tmp_path):
  """gs:// through the local stand-in (tests/gcs_standin.py): each process writes its own shards of every
  checkpoint into the bucket, only process 0 writes metrics and TensorBoard, and the losses are one process's."""
  import gcs_standin  # pylint: disable=g-import-not-at-top
  single = _run('data', tmp_path / 'one', 1)[0]
  with gcs_standin.fake_gcs(tmp_path / 'gcs.log') as env:
    two = _run('data', f'gs://{gcs_standin.BUCKET}/two', 2, env)
    names = gcs_standin.objects(env, 'two/')
    metrics = gcs_standin.read(env, 'two/metrics.jsonl').decode().splitlines()
  for result in two:
    for key, value in single.items():
      assert result[key] == pytest.approx(value, rel=1e-4), key
  for step in (2, 4):
    assert f'two/checkpoints/{step}/commit_success.txt' in names
    for process in (0, 1):
      assert any(n.startswith(f'two/checkpoints/{step}/state/ocdbt.process_{process}/') for n in names), process
  assert [json.loads(line)['step'] for line in metrics] == [2, 4]
  assert len([n for n in names if n.startswith('two/tensorboard/events.out.tfevents.')]) == 1
