"""launch/tpu/tpu.sh in a dry run: every command it would run, printed shell-quoted, parsed back here."""
import os
import pathlib
import shlex
import subprocess

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / 'launch' / 'tpu' / 'tpu.sh'


def dry(*args, **env):
  full = {**os.environ, 'DRY_RUN': '1', 'TPU_NAME': 'slice', 'ZONE': 'us-west4-a', 'NUM_WORKERS': '2', **env}
  proc = subprocess.run(['bash', str(SCRIPT), *args], env=full, capture_output=True, text=True, timeout=60)
  return proc.returncode, [shlex.split(line) for line in proc.stdout.splitlines()], proc.stderr


def test_create_setup_train_logs_delete_print_their_gcloud_commands():
  rc, (create,), _ = dry('create', PROJECT='proj', ACCELERATOR_TYPE='v5litepod-8')
  assert rc == 0 and create[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create']
  assert {'slice', '--zone=us-west4-a', '--project=proj', '--accelerator-type=v5litepod-8'} <= set(create)
  rc, (setup,), _ = dry('setup')
  assert rc == 0 and setup[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh'] and '--worker=all' in setup
  remote = next(a for a in setup if a.startswith('--command='))
  assert "pip install -q -e '.[tpu]'" in remote and 'git clone' in remote
  rc, (train,), _ = dry('train', '--config=configs/lm_1b.py', '--workdir=gs://bucket/runs/a b')
  remote = shlex.split(next(a for a in train if a.startswith('--command='))[len('--command='):])
  assert rc == 0 and '--worker=all' in train  # the same command on every worker at once
  assert remote[:4] == ['cd', 'batchax', '&&', '.venv/bin/python']
  assert remote[4:9] == ['-m', 'launch.train', '--distributed_auto', '--config=configs/lm_1b.py',
                         '--workdir=gs://bucket/runs/a b']  # arguments survive the remote shell's quoting
  rc, logs, _ = dry('logs')
  assert rc == 0 and logs[0] == ['mkdir', '-p', 'tpu-logs']
  assert [c[-1] for c in logs[1:]] == ['--worker=0', '--worker=1']
  assert [c[6] for c in logs[1:]] == ['tpu-logs/worker-0.log', 'tpu-logs/worker-1.log']
  rc, (delete,), _ = dry('delete')
  assert rc == 0 and delete[4] == 'delete' and '--quiet' in delete


@pytest.mark.parametrize('args, env, message', [
    (['create'], {'TPU_NAME': ''}, 'set TPU_NAME'),
    (['create'], {'ZONE': ''}, 'set ZONE'),
    (['launch'], {}, 'unknown command: launch'),
])
def test_bad_use_says_what_is_missing(args, env, message):
  rc, out, err = dry(*args, **env)
  assert rc != 0 and not out and message in err
