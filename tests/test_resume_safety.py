"""A resume that would silently do the wrong thing is refused, naming the field, before anything compiles.

- A different data stream (files, seq_len, held-out fraction, seed, ...) than the one the checkpoint's data
  position counts; `allow_data_change` resumes anyway, with a warning.
- An optimizer state of another structure (SGD with momentum 0 vs > 0, clipping on vs off).
- A checkpoint whose saved config lacks fields this version needs (an older batchax).
- A --workdir that is a file, under a file, or not writable.
"""
import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from framework import config as config_lib
from framework import loop
from framework import resume

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = 'red green blue cyan magenta yellow black white orange purple brown grey'.split()


def write_texts(root, n=8, seed=0):
  root.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  for i in range(n):
    (root / f'doc{i:02d}.txt').write_text(' '.join(rng.choice(WORDS, size=120)) + '\n')
  return str(root / '*.txt')


def small_config(path, **overrides):
  cfg = config_lib.defaults()
  cfg.model.update(d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=64, max_seq_len=16, vocab_size=384)
  cfg.data.update(source='text', path=path, heldout_fraction=0.5, seq_len=16, prefetch=0)
  cfg.train.update(steps=2, batch_size=8, log_every=1, eval_every=0)
  cfg.optim.update(schedule='constant', warmup_steps=0)
  cfg.mesh.update(data=-1)
  cfg.checkpoint.update(every_steps=2, async_save=False)
  cfg.metrics.update(peak_flops_per_device=1e12, tensorboard=False)
  for dotted, value in overrides.items():
    if '__' in dotted:
      section, key = dotted.split('__')
      cfg[section][key] = value
    else:
      cfg[dotted] = value
  return cfg


@pytest.fixture(scope='module')
def saved_run(tmp_path_factory):
  """A 2-step run with a checkpoint at step 2; each test copies it and tries to resume it to step 4."""
  base = tmp_path_factory.mktemp('resume')
  path = write_texts(base / 'texts')
  workdir = base / 'run'
  loop.train(small_config(path), str(workdir))
  return base, path, workdir


def resume_copy(saved_run, tmp_path, monkeypatch, cfg_changes=None, path=None, **kwargs):
  """Resumes a copy of the saved run with `cfg_changes`; a Trainer built before the refusal fails the test."""
  base, saved_path, workdir = saved_run
  copy = tmp_path / 'run'
  shutil.copytree(workdir, copy)

  def no_trainer(*args, **kw):
    raise AssertionError('a Trainer was built (and would compile) before the resume was checked')

  monkeypatch.setattr(loop, 'Trainer', no_trainer)
  return loop.train(small_config(path or saved_path, train__steps=4, **(cfg_changes or {})), str(copy), **kwargs)


@pytest.mark.parametrize('changes,field', [
    ({'data__seq_len': 8}, 'data.seq_len'),
    ({'data__heldout_fraction': 0.4}, 'data.heldout_fraction'),
    ({'seed': 7}, 'seed'),
    ({'data__max_corpus_bytes': 2000}, 'packed stream fingerprint'),
])
def test_a_different_data_stream_is_refused(saved_run, tmp_path, monkeypatch, changes, field):
  with pytest.raises(ValueError, match='different data stream') as info:
    resume_copy(saved_run, tmp_path, monkeypatch, changes)
  assert field in str(info.value)
  assert '--allow_data_change' in str(info.value)


def test_changed_files_are_refused(saved_run, tmp_path, monkeypatch):
  base, path, _ = saved_run
  other = tmp_path / 'texts'
  shutil.copytree(base / 'texts', other)
  (other / 'doc03.txt').write_text('a different document entirely\n' * 20)
  with pytest.raises(ValueError, match='different data stream') as info:
    resume_copy(saved_run, tmp_path, monkeypatch, path=str(other / '*.txt'))
  message = str(info.value)
  # The path moved and one file changed size and content: all three are named.
  assert 'data.path:' in message and 'data.path (matched files)' in message and 'fingerprint' in message


def test_the_same_stream_at_a_new_place_is_refused_only_for_the_path(saved_run, tmp_path, monkeypatch):
  base, _, _ = saved_run
  moved = tmp_path / 'moved'
  shutil.copytree(base / 'texts', moved)
  with pytest.raises(ValueError) as info:
    resume_copy(saved_run, tmp_path, monkeypatch, path=str(moved / '*.txt'))
  message = str(info.value)
  assert 'data.path:' in message
  assert 'matched files' not in message and 'fingerprint' not in message


def test_allow_data_change_resumes_with_a_warning(saved_run, tmp_path, caplog):
  base, path, workdir = saved_run
  copy = tmp_path / 'run'
  shutil.copytree(workdir, copy)
  with caplog.at_level(logging.WARNING):
    out = loop.train(small_config(path, train__steps=4, data__heldout_fraction=0.4), str(copy),
                     allow_data_change=True)
  assert out['step'] == 4
  assert any('DIFFERENT DATA STREAM' in r.getMessage() and 'data.heldout_fraction' in r.getMessage()
             for r in caplog.records)


def test_the_unchanged_stream_resumes(saved_run, tmp_path):
  _, path, workdir = saved_run
  copy = tmp_path / 'run'
  shutil.copytree(workdir, copy)
  assert loop.train(small_config(path, train__steps=4), str(copy))['step'] == 4


@pytest.mark.parametrize('changes,field', [
    ({'optim__name': 'sgd', 'optim__momentum': 0.0}, 'optim.name'),
    ({'optim__grad_clip': 0.0}, 'optim.grad_clip'),
    ({'model__tie_embeddings': True}, 'model.tie_embeddings'),
])
def test_a_different_state_structure_is_refused(saved_run, tmp_path, monkeypatch, changes, field):
  with pytest.raises(ValueError, match='different model or optimizer') as info:
    resume_copy(saved_run, tmp_path, monkeypatch, changes)
  assert field in str(info.value)


def test_sgd_momentum_on_off_is_refused(tmp_path, monkeypatch):
  path = write_texts(tmp_path / 'texts')
  workdir = tmp_path / 'run'
  loop.train(small_config(path, optim__name='sgd', optim__momentum=0.9), str(workdir))
  # Momentum 0.5 keeps a buffer like 0.9 does: allowed.
  assert loop.train(small_config(path, train__steps=3, optim__name='sgd', optim__momentum=0.5),
                    str(workdir))['step'] == 3
  monkeypatch.setattr(loop, 'Trainer', lambda *a, **k: pytest.fail('built a Trainer'))
  with pytest.raises(ValueError, match=r'optim\.momentum \(on/off\): checkpoint True vs config False'):
    loop.train(small_config(path, train__steps=4, optim__name='sgd', optim__momentum=0.0), str(workdir))


def _edit_saved_config(workdir, edit):
  for step in os.listdir(workdir / 'checkpoints'):
    if step.isdigit():
      target = workdir / 'checkpoints' / step / 'config' / 'metadata'
      saved = json.loads(target.read_text())
      edit(saved)
      target.write_text(json.dumps(saved))


def test_a_saved_config_without_needed_fields_is_refused(saved_run, tmp_path, monkeypatch):
  _, _, workdir = saved_run
  original = workdir / 'checkpoints' / '2' / 'config' / 'metadata'
  assert original.exists()  # where Orbax's JsonSave keeps the item; the edit below relies on it
  base, path, _ = saved_run
  older = tmp_path / 'older'
  shutil.copytree(workdir, older)
  _edit_saved_config(older, lambda c: c['model'].pop('n_kv_heads'))
  monkeypatch.setattr(loop, 'Trainer', lambda *a, **k: pytest.fail('built a Trainer'))
  with pytest.raises(ValueError, match=r'lacks fields.*model\.n_kv_heads'):
    loop.train(small_config(path, train__steps=4), str(older))


def test_a_saved_config_without_other_fields_resumes_with_a_warning(saved_run, tmp_path, caplog):
  base, path, workdir = saved_run
  older = tmp_path / 'older'
  shutil.copytree(workdir, older)
  _edit_saved_config(older, lambda c: c['train'].pop('micro_grad_norms'))
  with caplog.at_level(logging.WARNING):
    assert loop.train(small_config(path, train__steps=4), str(older))['step'] == 4
  assert any('train.micro_grad_norms' in r.getMessage() for r in caplog.records)


def test_a_checkpoint_without_a_data_record_is_refused(saved_run, tmp_path, monkeypatch):
  base, path, workdir = saved_run
  older = tmp_path / 'older'
  shutil.copytree(workdir, older)
  data = older / 'checkpoints' / '2' / 'data' / 'metadata'
  record = json.loads(data.read_text())
  record.pop('stream')
  data.write_text(json.dumps(record))
  monkeypatch.setattr(loop, 'Trainer', lambda *a, **k: pytest.fail('built a Trainer'))
  with pytest.raises(ValueError, match='records no data stream'):
    loop.train(small_config(path, train__steps=4), str(older))


# --- the workdir --------------------------------------------------------------------------------------------


def test_workdir_checks(tmp_path):
  a_file = tmp_path / 'file'
  a_file.write_text('x')
  with pytest.raises(ValueError, match='is a file, not a directory'):
    resume.check_workdir(str(a_file))
  with pytest.raises(ValueError, match='is a file, so the directory cannot be created'):
    resume.check_workdir(str(a_file / 'run'))
  # /proc refuses new files even to root, whom permission bits do not stop.
  with pytest.raises(ValueError, match='cannot write in /proc'):
    resume.check_workdir('/proc/batchax-run')
  resume.check_workdir(str(tmp_path / 'new' / 'run'))  # creatable: fine, and nothing is created yet
  assert not (tmp_path / 'new').exists()


@pytest.mark.parametrize('case', ['workdir_is_a_file', 'bad_axis_rule', 'negative_seed', 'bad_cpu_devices'])
def test_launcher_prints_one_line(tmp_path, case):
  a_file = tmp_path / 'file'
  a_file.write_text('x')
  args = {
      'workdir_is_a_file': [f'--workdir={a_file}'],
      'bad_axis_rule': [f'--workdir={tmp_path / "run"}', "--config.mesh.axis_rules=(('head', 'tensor'),)"],
      'negative_seed': [f'--workdir={tmp_path / "run"}', '--config.seed=-3'],
      'bad_cpu_devices': [f'--workdir={tmp_path / "run"}', '--cpu_devices=-2'],
  }[case]
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env['JAX_PLATFORMS'] = 'cpu'
  proc = subprocess.run([sys.executable, '-m', 'launch.train', '--config=configs/lm_tiny.py', *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert 'Traceback' not in proc.stderr, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('error: '), proc.stderr[-2000:]
  expected = {'workdir_is_a_file': 'is a file', 'bad_axis_rule': "did you mean 'heads'",
              'negative_seed': 'config seed', 'bad_cpu_devices': '--cpu_devices'}[case]
  assert expected in last, last
  assert not (tmp_path / 'run').exists()
