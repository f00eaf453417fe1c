"""launch/slurm/train.sbatch runs unchanged under a local stand-in for SLURM: the environment srun gives its tasks
(SLURM_JOB_ID, SLURM_NTASKS, SLURM_PROCID, SLURM_LOCALID, SLURM_STEP_NODELIST, ...) set by a fake `srun` that
starts the tasks as local processes, so `launch.train --distributed_auto` finds its coordinator and process id
as on a cluster (jax's SLURM detection). Two processes of 4 fake CPU devices each train one run together."""
import os
import pathlib
import socket
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
FAKE_SRUN = r'''#!/bin/bash
# srun on one machine: SLURM_NTASKS local tasks, each with the environment srun gives it.
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_NODEID=0 SLURM_STEP_NODELIST=localhost SLURM_STEP_NUM_NODES=1 "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
'''
SMALL = ['--config.model.d_model=64', '--config.model.n_layers=2', '--config.model.n_heads=4',
         '--config.model.n_kv_heads=4', '--config.model.d_ff=128', '--config.model.max_seq_len=64',
         '--config.data.seq_len=32', '--config.data.max_corpus_bytes=1500000', '--config.train.steps=4',
         '--config.train.batch_size=16', '--config.train.log_every=2', '--config.train.eval_every=4',
         '--config.train.eval_batches=1', '--config.checkpoint.every_steps=2',
         '--config.metrics.peak_flops_per_device=1e9', '--config.mesh.dcn_data=2']


def _job_id_with_a_free_port() -> int:
  """jax derives the coordinator port from the job id (61440 + id % 4096): pick an id whose port is free."""
  with socket.socket() as s:
    for job in range(1000, 5096):
      try:
        s.bind(('127.0.0.1', 61440 + job % 4096))
        return job
      except OSError:
        continue
  raise RuntimeError('no free port in 61440-65535')


def test_the_sbatch_script_trains_two_processes_under_a_local_stand_in(tmp_path):
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  (bin_dir / 'srun').write_text(FAKE_SRUN)
  (bin_dir / 'srun').chmod(0o755)
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS',)}
  env.update(PATH=f'{bin_dir}:{env["PATH"]}', JAX_PLATFORMS='cpu', SLURM_JOB_ID=str(_job_id_with_a_free_port()),
             SLURM_NTASKS='2', SLURM_JOB_NUM_NODES='1', SLURM_SUBMIT_DIR=str(REPO), BATCHAX_PYTHON=sys.executable)
  workdir = tmp_path / 'run'
  proc = subprocess.run(['bash', str(REPO / 'launch' / 'slurm' / 'train.sbatch'), '--config=configs/lm_tiny.py',
                         f'--workdir={workdir}', '--cpu_devices=4', '--distributed_timeout=120', *SMALL],
                        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert 'batchax: job' in proc.stdout and '2 tasks' in proc.stdout
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '4']
  assert len((workdir / 'metrics.jsonl').read_text().splitlines()) == 2  # process 0 alone writes metrics
  lines = proc.stderr.splitlines()
  assert any('[process 1/2] Process 1 of 2' in line for line in lines), proc.stderr[-3000:]
  progress = [line for line in lines if 'loop.py' in line and ' step 4/4' in line]
  assert progress and all('[process 0/2]' in line for line in progress)  # only process 0 prints progress
