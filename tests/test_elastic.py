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

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = {'train.log_every': 1, 'data.seq_len': 32, 'train.batch_size': 8, 'data.max_corpus_bytes': 300000,
        'checkpoint.every_steps': 3, 'optim.warmup_steps': 2, 'data.heldout_fraction': 0.2, 'train.eval_every': 0,
        'model.d_model': 64, 'model.n_layers': 2, 'model.d_ff': 128}


def train(workdir, devices: int, steps: int, **changes):
  flags = {**BASE, 'train.steps': steps, **changes}
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env['JAX_PLATFORMS'] = 'cpu'
  cmd = [sys.executable, '-m', 'launch.train', '--config=configs/lm_tiny.py', f'--workdir={workdir}',
         f'--cpu_devices={devices}'] + [f'--config.{k}={v}' for k, v in flags.items()]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return {r['step']: r for r in map(json.loads, f)}


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
