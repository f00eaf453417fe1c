"""`python -m launch.generate` end to end: a checkpoint saved on one mesh served on another, a Llama-format
directory, per-line errors, the summary, and one-line errors for bad flags."""
import json

import numpy as np
import pytest

from framework.inference import hf_format
from framework.inference.requests import ByteCodec
from framework.inference.sampling import SamplingParams
from serving_setup import OVERRIDES, expected, save_run, small_cfg
from serving_setup import launch as launch_module


def launch(*args, timeout=300):
  return launch_module('launch.generate', '--progress', *args, timeout=timeout)


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('run')
  return workdir, save_run(workdir)


def write_prompts(path, lines):
  path.write_text(''.join((line if isinstance(line, str) else json.dumps(line)) + '\n' for line in lines))


def test_serves_a_checkpoint_on_another_mesh_with_per_line_errors(run_dir, tmp_path):
  workdir, params = run_dir
  prompts = tmp_path / 'prompts.jsonl'
  write_prompts(prompts, [
      {'id': 'a', 'prompt': 'hello there'},
      'not json',
      {'prompt': 'x' * 80},                                # longer than the context
      {'id': 7, 'prompt': 'the cat', 'max_tokens': 3, 'logprobs': True},
      {'prompt': 'hi', 'temperature': 'hot'},
      {'id': 'q5', 'prompt': 'hi', 'best_of': 2},
      {'id': 'b', 'tokens': [1, 50, 60, 70], 'stop': ['\n']},
  ])
  out, summary = tmp_path / 'out.jsonl', tmp_path / 'summary.json'
  proc = launch('--config=configs/lm_tiny.py', f'--workdir={workdir}', f'--prompts={prompts}', f'--output={out}',
                f'--summary={summary}', '--max_tokens=6', '--config.mesh.tensor=2', '--config.mesh.data=1', *OVERRIDES)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r['finish_reason'] == 'error' for r in rows] == [False, True, True, False, True, True, False]
  assert [r['id'] for r in rows][::3] == ['a', '7', 'b'] and rows[5]['id'] == 'q5'  # a bad line keeps its id
  assert 'not JSON' in rows[1]['error'] and 'leave no room' in rows[2]['error']
  assert 'temperature' in rows[4]['error'] and 'best_of: unknown field' in rows[5]['error']
  want = expected(params, ['hello there', 'the cat'], 6)
  assert rows[0]['tokens'] == want[0].tokens and rows[0]['text'] == want[0].text
  assert rows[3]['tokens'] == want[1].tokens[:3] and len(rows[3]['logprobs']) == len(rows[3]['tokens'])
  assert rows[0]['time_to_first_token'] > 0
  stats = json.loads(summary.read_text())
  assert stats['requests'] == 7 and stats['errors'] == 4
  assert stats['generated_tokens'] == sum(len(r['tokens']) for r in rows) and stats['tokens_per_s'] > 0
  assert stats['kv_peak_bytes'] > 0 and stats['tbt_p99_s'] >= stats['tbt_p50_s'] > 0
  assert 'tok/s' in proc.stdout and '7/7 requests' in proc.stderr


def test_serves_a_llama_format_directory(run_dir, tmp_path):
  _, params = run_dir
  model_dir = tmp_path / 'llama'
  hf_format.export(small_cfg(), params, str(model_dir), codec=ByteCodec())
  prompts = tmp_path / 'prompts.jsonl'
  write_prompts(prompts, [{'prompt': 'hello there'}, {'prompt': 'the cat', 'max_tokens': 3}])
  out = tmp_path / 'out.jsonl'
  proc = launch(f'--model_dir={model_dir}', f'--prompts={prompts}', f'--output={out}', '--max_tokens=6',
                '--config=configs/lm_tiny.py', *OVERRIDES)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  want = expected(params, ['hello there', 'the cat'], 6)
  assert [r['tokens'] for r in rows] == [want[0].tokens, want[1].tokens[:3]]


def test_a_draft_model_from_flags_keeps_greedy_output(run_dir, tmp_path):
  workdir, params = run_dir
  prompts = tmp_path / 'prompts.jsonl'
  write_prompts(prompts, [{'prompt': 'hello there'}, {'prompt': 'the cat', 'max_tokens': 3}])
  out, summary = tmp_path / 'out.jsonl', tmp_path / 'summary.json'
  draft = [a.replace('--config.', '--draft_config.') for a in OVERRIDES if a.startswith('--config.model')]
  proc = launch('--config=configs/lm_tiny.py', f'--workdir={workdir}', f'--prompts={prompts}', f'--output={out}',
                f'--summary={summary}', '--max_tokens=6', *OVERRIDES, '--draft_config=configs/lm_tiny.py',
                f'--draft_workdir={workdir}', *draft)  # the target as its own draft: every token accepted
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  want = expected(params, ['hello there', 'the cat'], 6)
  assert [r['tokens'] for r in rows] == [want[0].tokens, want[1].tokens[:3]]
  stats = json.loads(summary.read_text())
  assert stats['acceptance_rate'] == 1.0 and stats['tokens_per_target_pass'] > 1
  assert 'speculative: 100% of draft tokens accepted' in proc.stdout


@pytest.mark.parametrize('args, message', [
    (['--prompts=/nonexistent.jsonl'], '--prompts: /nonexistent.jsonl is not a file'),
    (['--config.model.d_model=128'], 'model.d_model: the checkpoint was trained with 64'),
    (['--workdir=/nonexistent-run'], 'holds no checkpoints/'),
    (['--temperature=-1'], 'temperature'),
    (['--draft_config=configs/lm_tiny.py'], '--draft_config, --draft_workdir: give both'),
    (['--draft_config=configs/lm_tiny.py', '--draft_workdir=/nonexistent-draft'], '--draft_workdir: '),
    (['--draft_config=configs/lm_tiny.py', '--draft_config.model.vocab_size=384', '--draft_workdir=/x'],
     '--draft_config: draft model.vocab_size: 384'),
], ids=['no_prompts', 'model_mismatch', 'no_checkpoint', 'bad_default', 'draft_half', 'draft_missing',
        'draft_vocab'])
def test_user_errors_print_one_line(run_dir, tmp_path, args, message):
  workdir, _ = run_dir
  prompts = tmp_path / 'prompts.jsonl'
  write_prompts(prompts, [{'prompt': 'hi'}])
  base = ['--config=configs/lm_tiny.py', f'--workdir={workdir}', f'--prompts={prompts}',
          f'--output={tmp_path / "out.jsonl"}', *OVERRIDES]
  proc = launch(*base, *args, timeout=120)
  assert proc.returncode != 0
  assert message in proc.stderr, proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr
  assert not (tmp_path / 'out.jsonl').exists()


def test_a_bad_line_never_stops_the_rest():
  from framework.inference.requests import request_from_json
  defaults = SamplingParams(max_tokens=5, temperature=0.5)
  r = request_from_json({'prompt': 'x', 'stop': 'ab', 'top_k': 3}, defaults)
  assert r.sampling == SamplingParams(max_tokens=5, temperature=0.5, top_k=3, stop=('ab',))
  for obj, message in [([1], 'JSON object'), ({'prompt': 'x', 'stop': 3}, 'stop'),
                       ({'prompt': 'x', 'logprobs': 1}, 'logprobs'), ({'prompt': 'x', 'id': [1]}, 'id')]:
    with pytest.raises(ValueError, match=message):
      request_from_json(obj, defaults)
  np.testing.assert_equal(request_from_json({'tokens': [1, 2]}, defaults).tokens, [1, 2])
