"""A gs:// workdir, through a local GCS stand-in (tests/gcs_standin.py): `launch.train` checkpoints, logs
metrics and TensorBoard into the bucket, resumes from it (moving an incomplete step aside) and ends where a
local run does; `launch.generate` serves the bucket's checkpoint; a bucket that cannot be written is refused in
one line before anything compiles."""
import json
import subprocess
import sys

import pytest

import gcs_standin
from serving_setup import REPO

WORKDIR = f'gs://{gcs_standin.BUCKET}/runs/a'
FLAGS = {'model.d_model': 64, 'model.n_layers': 2, 'model.n_heads': 4, 'model.n_kv_heads': 2, 'model.d_ff': 128,
         'model.max_seq_len': 64, 'data.seq_len': 32, 'train.batch_size': 8, 'train.log_every': 1,
         'train.eval_every': 0, 'data.max_corpus_bytes': 300000, 'checkpoint.every_steps': 2,
         'optim.warmup_steps': 0, 'optim.schedule': 'constant', 'data.heldout_fraction': 0.2,
         'metrics.peak_flops_per_device': 1e9}  # a constant LR: a run resumed at step 4 can match a straight one


def _launch(module, env, *args, **flags):
  cmd = [sys.executable, '-m', module, '--cpu_devices=2', *args]
  if module == 'launch.train':
    cmd += ['--config=configs/lm_tiny.py'] + [f'--config.{k}={v}' for k, v in {**FLAGS, **flags}.items()]
  run_env = {k: v for k, v in gcs_standin.env_with(env).items() if k != 'XLA_FLAGS'}
  run_env['JAX_PLATFORMS'] = 'cpu'
  return subprocess.run(cmd, cwd=REPO, env=run_env, capture_output=True, text=True, timeout=300)


def _records(env, workdir_prefix):
  lines = gcs_standin.read(env, f'{workdir_prefix}/metrics.jsonl').decode().splitlines()
  return [json.loads(line) for line in lines]


@pytest.fixture(scope='module')
def bucket(tmp_path_factory):
  log = tmp_path_factory.mktemp('gcs') / 'emulator.log'
  with gcs_standin.fake_gcs(log) as env:
    first = _launch('launch.train', env, f'--workdir={WORKDIR}', **{'train.steps': 4})
    assert first.returncode == 0, first.stderr[-4000:]
    yield env, first


def test_a_run_writes_checkpoints_metrics_and_tensorboard_into_the_bucket(bucket):
  env, _ = bucket
  names = gcs_standin.objects(env, 'runs/a/')
  for step in (2, 4):  # Orbax's gs:// protocol: written in place, committed by the marker it writes last
    for item in ('', 'state/', 'data/', 'config/'):
      assert f'runs/a/checkpoints/{step}/{item}commit_success.txt' in names
    assert f'runs/a/checkpoints/{step}/state/_METADATA' in names
  assert not [n for n in names if 'orbax-checkpoint-tmp' in n or 'batchax-write-check' in n]
  assert [r['step'] for r in _records(env, 'runs/a')] == [1, 2, 3, 4]
  events = [n for n in names if n.startswith('runs/a/tensorboard/events.out.tfevents.')]
  assert len(events) == 1 and b'loss' in gcs_standin.read(env, events[0])
  assert json.loads(gcs_standin.read(env, 'runs/a/config.json'))['train']['steps'] == 4


def test_a_resume_from_the_bucket_skips_an_incomplete_step_and_matches_a_local_run(bucket, tmp_path):
  env, _ = bucket
  gcs_standin.upload(env, 'runs/a/checkpoints/6/state/_METADATA', b'{}')  # a save cut off: no commit marker
  resumed = _launch('launch.train', env, f'--workdir={WORKDIR}', **{'train.steps': 6})
  assert resumed.returncode == 0, resumed.stderr[-4000:]
  assert 'Checkpoint gs://bucket/runs/a/checkpoints/6 is incomplete (Orbax does not count it as finalized)' in resumed.stderr, resumed.stderr[-4000:]
  assert f'Resumed from {WORKDIR}/checkpoints/4' in resumed.stderr
  assert list(gcs_standin.objects(env, 'runs/a/checkpoints-incomplete/')) == [next(
      n for n in gcs_standin.objects(env, 'runs/a/checkpoints-incomplete/6-') if n.endswith('/state/_METADATA'))]
  remote = _records(env, 'runs/a')
  assert [r['step'] for r in remote] == [1, 2, 3, 4, 5, 6]
  local = _launch('launch.train', env, f'--workdir={tmp_path / "local"}', **{'train.steps': 6})
  assert local.returncode == 0, local.stderr[-4000:]
  with open(tmp_path / 'local' / 'metrics.jsonl', encoding='utf-8') as f:
    straight = [json.loads(line) for line in f]
  for a, b in zip(remote, straight):
    assert a['loss'] == pytest.approx(b['loss'], rel=1e-6), a['step']


def test_generate_serves_the_checkpoint_in_the_bucket(bucket, tmp_path):
  env, _ = bucket
  prompts = tmp_path / 'prompts.jsonl'
  prompts.write_text(json.dumps({'id': 'a', 'tokens': [1, 2, 3], 'max_tokens': 4}) + '\n')
  overrides = [f'--config.{k}={v}' for k, v in FLAGS.items() if k.startswith(('model.', 'data.seq_len'))]
  out = tmp_path / 'out.jsonl'
  proc = _launch('launch.generate', env, '--config=configs/lm_tiny.py', *overrides, f'--workdir={WORKDIR}',
                 f'--prompts={prompts}', f'--output={out}', '--temperature=0')
  assert proc.returncode == 0, proc.stderr[-4000:]
  (line,) = out.read_text().splitlines()
  result = json.loads(line)
  assert result['id'] == 'a' and len(result['tokens']) == 4 and result['finish_reason'] == 'length'


@pytest.mark.parametrize('workdir, message', [
    ('gs://no-such-bucket/run', "--workdir 'gs://no-such-bucket/run': cannot write there"),
    ('ftp://host/run', "--workdir 'ftp://host/run': ftp:// is not a supported storage scheme"),
])
def test_a_workdir_that_cannot_be_written_is_refused_in_one_line(bucket, workdir, message):
  env, _ = bucket
  proc = _launch('launch.train', env, f'--workdir={workdir}', **{'train.steps': 2})
  assert proc.returncode != 0 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  assert message in proc.stderr, proc.stderr[-3000:]
