"""Elastic restarts through the launcher: a run saved on 8 devices (data 2 x fsdp 2 x tensor 2) resumes on 4 and
on 2 devices with other meshes and more gradient-accumulation micro-batches, with the same global batch: the
examples it reads are the uninterrupted run's, and its losses match the uninterrupted run's within f32 tolerance
(rel 1e-4: another mesh sums in another order)."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from ports import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = {'train.log_every': 1, 'data.seq_len': 32, 'train.batch_size': 8, 'data.max_corpus_bytes': 300000,
        'checkpoint.every_steps': 3, 'optim.warmup_steps': 2, 'data.heldout_fraction': 0.2, 'train.eval_every': 0,
        'model.d_model': 64, 'model.n_layers': 2, 'model.d_ff': 128}


def _command(workdir, devices: int, steps: int, changes: dict) -> list[str]:
  flags = {**BASE, 'train.steps': steps, **changes}
  return [sys.executable, '-m', 'launch.train', '--config=configs/lm_tiny.py', f'--workdir={workdir}',
          f'--cpu_devices={devices}'] + [f'--config.{k}={v}' for k, v in flags.items()]


def _env() -> dict:
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env['JAX_PLATFORMS'] = 'cpu'
  return env


def _records(workdir) -> dict:
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return {r['step']: r for r in map(json.loads, f)}


def train(workdir, devices: int, steps: int, **changes):
  """One process with `devices` devices; returns the metrics by step (and, via train.log, its stderr)."""
  proc = subprocess.run(_command(workdir, devices, steps, changes), cwd=REPO, env=_env(), capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  train.log = proc.stderr
  return _records(workdir)


def train_processes(workdir, processes: int, devices: int, steps: int, **changes):
  """`processes` local processes of `devices` devices each, one job over gloo; returns process 0's stderr."""
  port = free_port()
  procs = [subprocess.Popen(_command(workdir, devices, steps, changes) + [
      f'--coordinator_address=127.0.0.1:{port}', f'--num_processes={processes}', f'--process_id={i}',
      '--distributed_timeout=120'], cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(processes)]
  try:
    outputs = [p.communicate(timeout=300) for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-4000:]
  return outputs[0][1]


@pytest.mark.slow
def test_resume_on_fewer_devices_other_meshes_and_more_micro_batches(tmp_path):
  eight = {'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.tensor': 2}
  straight = train(tmp_path / 'straight', 8, 6, **eight)
  saved = tmp_path / 'saved'
  train(saved, 8, 3, **eight)
  for devices, mesh, micro in ((4, {'mesh.data': 1, 'mesh.fsdp': 2, 'mesh.tensor': 2}, 2),
                               (2, {'mesh.data': 1, 'mesh.fsdp': 1, 'mesh.tensor': 2}, 4)):
    workdir = tmp_path / f'on{devices}'
    shutil.copytree(saved, workdir)
    resumed = train(workdir, devices, 6, **mesh, **{'train.micro_batches': micro})
    for step in (4, 5, 6):
      assert resumed[step]['examples'] == straight[step]['examples'] == step * 8
      assert resumed[step]['loss'] == pytest.approx(straight[step]['loss'], rel=1e-4), (devices, step)
      assert resumed[step]['grad_norm'] == pytest.approx(straight[step]['grad_norm'], rel=1e-3), (devices, step)


@pytest.mark.slow
def test_device_batch_recomputes_micro_batches_on_fewer_devices_and_on_two_processes(tmp_path):
  """train.device_batch=1 keeps one row per batch shard per micro-batch: saved on 8 devices (4 batch shards, 2
  micro-batches of 8 rows), the run resumes on 2 devices of one process (1 shard, 8 micro-batches) and on 2
  processes of 2 devices (2 shards across the processes, 4 micro-batches), each count logged."""
  eight = {'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.tensor': 2, 'train.device_batch': 1}
  straight = train(tmp_path / 'straight', 8, 6, **eight)
  assert 'train.micro_batches = 2: train.batch_size 8 / (4 batch shards (data x fsdp x expert) x train.device_batch 1)' in train.log
  saved = tmp_path / 'saved'
  train(saved, 8, 3, **eight)
  one = tmp_path / 'one_process'
  shutil.copytree(saved, one)
  resumed = {'one process': train(one, 2, 6, **{'mesh.data': 1, 'mesh.fsdp': 1, 'mesh.tensor': 2,
                                                'train.device_batch': 1})}
  assert 'train.micro_batches = 8: train.batch_size 8 / (1 batch shards (data x fsdp x expert) x train.device_batch 1)' in train.log
  two = tmp_path / 'two_processes'
  shutil.copytree(saved, two)
  log = train_processes(two, 2, 2, 6, **{'mesh.data': 1, 'mesh.dcn_data': 2, 'mesh.fsdp': 1, 'mesh.tensor': 2,
                                         'train.device_batch': 1})
  assert 'Resumed from' in log and 'train.micro_batches = 4: train.batch_size 8 / (2 batch shards' in log, log[-3000:]
  resumed['two processes'] = _records(two)
  for where, records in resumed.items():
    for step in (4, 5, 6):
      assert records[step]['examples'] == straight[step]['examples'] == step * 8
      assert records[step]['loss'] == pytest.approx(straight[step]['loss'], rel=1e-4), (where, step)
      assert records[step]['grad_norm'] == pytest.approx(straight[step]['grad_norm'], rel=1e-3), (where, step)


@pytest.mark.slow
def test_more_rows_per_device_than_the_saved_run_is_warned_about(tmp_path):
  saved = tmp_path / 'run'
  train(saved, 4, 3, **{'mesh.data': 2, 'mesh.fsdp': 2})  # 2 rows per batch shard
  train(saved, 2, 4, **{'mesh.data': 2, 'mesh.fsdp': 1})  # 4 rows per batch shard
  assert ('Each batch shard now holds 4 rows per micro-batch; the run that saved this checkpoint held 2. If it '
          'runs out of memory, set train.device_batch=2') in train.log
