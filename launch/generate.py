"""Generate completions for a file of prompts with the batched inference engine.

  python -m launch.generate --config=configs/lm_tiny.py --workdir=/tmp/run \
      --prompts=prompts.jsonl --output=out.jsonl [--max_tokens=64 --temperature=0.8 ...] [--config.inference.slots=16]
  python -m launch.generate --model_dir=/path/to/llama --prompts=prompts.jsonl --output=out.jsonl

A prompts line is a JSON object: "prompt" (text) or "tokens" (ids), an optional "id", and sampling fields named
as in the OpenAI API ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "logprobs"); the flags give
the defaults. The output has one line per prompts line, in input order: its id (default: the line's index
among the requests), text, tokens, finish_reason ('stop', 'length' or 'error' with the error) and timings. A bad line gets an error line; the others complete.
The summary (stdout, and --summary as JSON) gives tokens/s, time to first token, time between tokens (p50/p99)
and the KV memory used. Timings include compiling the engine's step for each new page-table width (a few per
run, at the start); `python -m launch.bench --suite=inference` measures warm engines.
"""
import json
import os
import sys
import time

from absl import app, flags

from launch import model_flags, runtime_flags

_PROMPTS = flags.DEFINE_string('prompts', None, 'JSON lines, one request each.')
_OUTPUT = flags.DEFINE_string('output', None, 'JSON lines, one result per prompts line, in input order.')
_SUMMARY = flags.DEFINE_string('summary', None, 'Also write the summary here as JSON.')
_MAX_TOKENS = flags.DEFINE_integer('max_tokens', None, 'Default output cap (default: inference.max_tokens).')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.0, 'Default temperature (0: greedy).')
_TOP_P = flags.DEFINE_float('top_p', 1.0, 'Default top-p (1: off).')
_TOP_K = flags.DEFINE_integer('top_k', 0, 'Default top-k (0: off).')
_SEED = flags.DEFINE_integer('seed', 0, 'Default sampling seed.')
_STOP = flags.DEFINE_multi_string('stop', [], 'Default stop string (repeat for several).')
_LOGPROBS = flags.DEFINE_bool('logprobs', False, 'Default: return each token\'s logprob.')
_PROGRESS = flags.DEFINE_bool('progress', True, 'Show a progress bar on stderr.')


def read_prompts(path: str, defaults) -> list:
  """One Request, or the ValueError that line raised, per non-blank line."""
  from framework.inference.requests import request_from_json  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise ValueError(f'--prompts: {path} is not a file')
  entries = []
  with open(path, encoding='utf-8') as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      obj = None
      try:
        obj = json.loads(line)
        request = request_from_json(obj, defaults)
        if request.id is None:
          request.id = str(len(entries))  # the line's index among the requests
        entries.append(request)
      except json.JSONDecodeError as e:
        entries.append(ValueError(f'line {number}: not JSON ({e.msg} at column {e.colno})'))
      except ValueError as e:
        error = ValueError(f'line {number}: {e}')
        rid = obj.get('id') if isinstance(obj, dict) else None
        error.request_id = str(rid) if isinstance(rid, (str, int)) and not isinstance(rid, bool) else None
        entries.append(error)
  if not entries:
    raise ValueError(f'--prompts: {path} holds no requests')
  return entries


class Progress:
  """Requests done, tokens, tokens/s; redrawn in place on a terminal, a line per 10% otherwise."""

  def __init__(self, total: int, enabled: bool):
    self.total, self.enabled = total, enabled
    self.tty = enabled and sys.stderr.isatty()
    self.done = self.tokens = 0
    self.start = time.perf_counter()
    self._shown = -1

  def update(self, token: bool, finished: bool) -> None:
    self.tokens += token
    self.done += finished
    if not self.enabled:
      return
    tenth = self.done * 10 // self.total
    if not self.tty and (not finished or tenth == self._shown):
      return
    self._shown = tenth
    elapsed = max(time.perf_counter() - self.start, 1e-9)
    bar = '#' * (self.done * 30 // self.total)
    line = (f'[{bar:<30}] {self.done}/{self.total} requests  {self.tokens} tokens  '
            f'{self.tokens / elapsed:.1f} tok/s')
    sys.stderr.write(f'\r{line}' if self.tty else f'{line}\n')
    if self.tty and self.done == self.total:
      sys.stderr.write('\n')
    sys.stderr.flush()


def summarize(results, wall_s: float, kv: dict) -> dict:
  import numpy as np  # pylint: disable=g-import-not-at-top
  ok = [r for r in results if r.finish_reason != 'error']
  ttft = [r.time_to_first_token for r in ok if r.time_to_first_token is not None]
  tbt = [t for r in ok for t in r.time_between_tokens]
  pct = lambda xs, q: float(np.percentile(xs, q)) if xs else None
  tokens = sum(len(r.tokens) for r in results)
  return {
      'requests': len(results), 'errors': len(results) - len(ok), 'generated_tokens': tokens,
      'prompt_tokens': sum(r.prompt_tokens for r in ok), 'wall_s': wall_s, 'tokens_per_s': tokens / wall_s,
      'ttft_p50_s': pct(ttft, 50), 'ttft_p99_s': pct(ttft, 99), 'tbt_p50_s': pct(tbt, 50), 'tbt_p99_s': pct(tbt, 99),
      'kv_peak_bytes': kv['kv_peak_bytes'], 'kv_peak_pages': kv['kv_pages_peak'],
      'kv_pool_bytes': kv['kv_pages'] * kv['kv_bytes_per_page'], 'preemptions': kv['preemptions'],
      'shared_prefix_pages': kv['shared_pages'],
      **{k: kv[k] for k in ('acceptance_rate', 'tokens_per_target_pass', 'speculative_rounds') if k in kv},
  }


def _line(summary: dict) -> str:
  ms = lambda v: 'n/a' if v is None else f'{1e3 * v:.1f} ms'
  return (f"{summary['requests']} requests ({summary['errors']} errors), {summary['generated_tokens']} tokens in "
          f"{summary['wall_s']:.2f} s: {summary['tokens_per_s']:.1f} tok/s; time to first token p50 "
          f"{ms(summary['ttft_p50_s'])} p99 {ms(summary['ttft_p99_s'])}; between tokens p50 "
          f"{ms(summary['tbt_p50_s'])} p99 {ms(summary['tbt_p99_s'])}; KV peak {summary['kv_peak_bytes'] / 2**20:.2f} "
          f"MiB ({summary['kv_peak_pages']} pages) of a {summary['kv_pool_bytes'] / 2**20:.2f} MiB pool; "
          f"{summary['preemptions']} preemptions, {summary['shared_prefix_pages']} prefix pages shared" +
          (f"; speculative: {summary['acceptance_rate']:.0%} of draft tokens accepted, "
           f"{summary['tokens_per_target_pass']:.2f} tokens per target pass"
           if summary.get('tokens_per_target_pass') is not None else ''))


def run() -> dict:
  """Checks the flags, builds the engine, generates, writes the output; returns the summary."""
  cfg = model_flags.load_config()
  for name, value in (('prompts', _PROMPTS.value), ('output', _OUTPUT.value)):
    if not value:
      raise ValueError(f'--{name}: required')
  from framework.inference.requests import Result  # pylint: disable=g-import-not-at-top  (after the device flags)
  from framework.inference.sampling import SamplingParams  # pylint: disable=g-import-not-at-top

  defaults = SamplingParams(
      max_tokens=cfg.inference.max_tokens if _MAX_TOKENS.value is None else _MAX_TOKENS.value,
      temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value, seed=_SEED.value,
      stop=tuple(_STOP.value), logprobs=_LOGPROBS.value)
  defaults.check(cfg.model.vocab_size)
  entries = read_prompts(_PROMPTS.value, defaults)
  out_dir = os.path.dirname(os.path.abspath(_OUTPUT.value))
  if not os.path.isdir(out_dir):
    raise ValueError(f'--output: directory {out_dir} does not exist')

  engine = model_flags.build_engine(cfg)
  progress = Progress(len(entries), _PROGRESS.value)
  for _ in range(sum(isinstance(e, ValueError) for e in entries)):
    progress.update(token=False, finished=True)
  start = time.perf_counter()
  served = iter(engine.generate([e for e in entries if not isinstance(e, ValueError)],
                                on_event=lambda e: progress.update(e.token is not None, e.finished)))
  wall = time.perf_counter() - start
  results = [Result(index=i, id=getattr(e, 'request_id', None) or str(i), finish_reason='error', error=str(e))
             if isinstance(e, ValueError)
             else next(served) for i, e in enumerate(entries)]
  tmp = _OUTPUT.value + '.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    for r in results:
      row = r.to_json()
      row['time_between_tokens_mean'] = (sum(r.time_between_tokens) / len(r.time_between_tokens)
                                         if r.time_between_tokens else None)
      f.write(json.dumps(row) + '\n')
  os.replace(tmp, _OUTPUT.value)  # a crash mid-write leaves no half-written output
  summary = summarize(results, wall, engine.kv_stats())
  if _SUMMARY.value:
    with open(_SUMMARY.value, 'w', encoding='utf-8') as f:
      json.dump(summary, f, indent=2)
  print(_line(summary))
  return summary


if __name__ == '__main__':
  app.run(runtime_flags.main_of(run, serving=True), flags_parser=runtime_flags.parse_flags)
