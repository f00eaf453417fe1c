"""The OpenAI API subset the server speaks (framework/inference/server.py): request bodies to engine Requests,
engine results to response bodies and stream chunks, and errors in OpenAI's shape. No HTTP here.

Completions: `prompt` is a string, a list of strings, a list of token ids or a list of lists of ids; choice
k = prompt i's j-th of `n` samples, k = i * n + j (OpenAI's order), sample j seeded with seed + j. Defaults
follow OpenAI (temperature 1) except max_tokens, which defaults to the engine's inference.max_tokens. A request
without a seed gets a random one (so identical sampled requests differ, as clients expect).
"""
from __future__ import annotations

import dataclasses
import json
import os
import secrets
import time
from typing import Any

from framework.inference.requests import Request, Result, request_from_json
from framework.inference.sampling import SamplingParams

DEFAULT_TEMPERATURE = 1.0  # OpenAI's
MAX_N = 128
_SAMPLING = ('max_tokens', 'temperature', 'top_p', 'top_k', 'seed', 'stop', 'ignore_eos')
_COMMON = ('model', 'n', 'stream', 'stream_options', 'user') + _SAMPLING
COMPLETION_FIELDS = ('prompt', 'logprobs') + _COMMON
CHAT_FIELDS = ('messages', 'logprobs', 'top_logprobs', 'max_completion_tokens') + _COMMON
# Accepted only at the value that changes nothing; anything else is refused rather than silently ignored.
_NEUTRAL = {'presence_penalty': 0, 'frequency_penalty': 0, 'best_of': 1, 'echo': False, 'logit_bias': None,
            'suffix': None}


class ApiError(Exception):
  """An error answered as {"error": {"message", "type", "param", "code"}} with `status`."""

  def __init__(self, status: int, message: str, param: str | None = None, kind: str = 'invalid_request_error',
               code: str | None = None, headers: dict | None = None):
    super().__init__(message)
    self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code
    self.headers = headers or {}

  def body(self) -> dict:
    return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str = 'invalid_request_error', param: str | None = None,
               code: str | None = None) -> dict:
  return {'error': {'message': message, 'type': kind, 'param': param, 'code': code}}


def bad_request(error: ValueError) -> ApiError:
  """The engine's and the parser's ValueErrors start with the field they name ("max_tokens: ...")."""
  message = str(error)
  field = message.split(':', 1)[0]
  return ApiError(400, message, param=field if field.replace('_', '').replace('.', '').isalnum() else None)


@dataclasses.dataclass
class Parsed:
  requests: list[Request]   # choice k's request at k
  n: int
  stream: bool
  include_usage: bool
  logprobs: bool            # return the chosen tokens' logprobs
  chat: bool


# --- parsing ---------------------------------------------------------------------------------------------------


def parse_completion(body: Any, model_name: str, max_tokens: int) -> Parsed:
  _check_fields(body, COMPLETION_FIELDS)
  common = _common(body, model_name)
  logprobs = body.get('logprobs')
  if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int) or logprobs < 0):
    raise ApiError(400, f'logprobs: must be null or an integer >= 0, got {logprobs!r}', 'logprobs')
  if logprobs:
    raise ApiError(400, f'logprobs: {logprobs} top alternatives per token are not supported; 0 returns each '
                   'chosen token\'s logprob', 'logprobs')
  prompts = _prompts(body.get('prompt'))
  return _build(body, prompts, common, max_tokens, logprobs is not None, chat=False)


def parse_chat(body: Any, model_name: str, max_tokens: int, template: ChatTemplate | None, codec) -> Parsed:
  if template is None:
    raise ApiError(400, 'messages: this model has no chat template (tokenizer_config.json "chat_template" in '
                   '--model_dir, or --chat_template=FILE); use /v1/completions', 'messages', code='no_chat_template')
  _check_fields(body, CHAT_FIELDS)
  common = _common(body, model_name)
  logprobs = body.get('logprobs', False)
  if not isinstance(logprobs, bool):
    raise ApiError(400, f'logprobs: must be true or false, got {logprobs!r}', 'logprobs')
  if body.get('top_logprobs') not in (None, 0):
    raise ApiError(400, 'top_logprobs: top alternatives per token are not supported; use logprobs: true for '
                   'each chosen token\'s logprob', 'top_logprobs')
  if 'max_completion_tokens' in body:
    if 'max_tokens' in body:
      raise ApiError(400, 'max_completion_tokens: give it or max_tokens, not both', 'max_completion_tokens')
    body = dict(body, max_tokens=body['max_completion_tokens'])
  ids = codec.encode_chat(template.render(body.get('messages')))
  return _build(body, [{'tokens': ids}], common, max_tokens, logprobs, chat=True)


def _check_fields(body: Any, allowed: tuple) -> None:
  if not isinstance(body, dict):
    raise ApiError(400, f'body: must be a JSON object, got {type(body).__name__}')
  for name, value in body.items():
    if name in allowed:
      continue
    if name in _NEUTRAL:
      if value == _NEUTRAL[name] or value is None:
        continue
      raise ApiError(400, f'{name}: not supported (only {_NEUTRAL[name]!r})', name)
    raise ApiError(400, f'{name}: unknown field; this endpoint takes {", ".join(allowed)}', name)


def _common(body: dict, model_name: str) -> dict:
  model = body.get('model')
  if model is not None and model != model_name:
    raise ApiError(404, f'model: {model!r} is not served here; this server serves {model_name!r}', 'model',
                   code='model_not_found')
  n = body.get('n', 1)
  if n is None:
    n = 1
  if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
    raise ApiError(400, f'n: must be an integer in [1, {MAX_N}], got {n!r}', 'n')
  stream = body.get('stream', False)
  if stream is None:
    stream = False
  if not isinstance(stream, bool):
    raise ApiError(400, f'stream: must be true or false, got {stream!r}', 'stream')
  options = body.get('stream_options') or {}
  if not isinstance(options, dict) or set(options) - {'include_usage'} or \
      not isinstance(options.get('include_usage', False), bool):
    raise ApiError(400, f'stream_options: must be {{"include_usage": true|false}}, got {options!r}',
                   'stream_options')
  if options and not stream:
    raise ApiError(400, 'stream_options: only with stream: true', 'stream_options')
  return {'n': n, 'stream': stream, 'include_usage': options.get('include_usage', False)}


def _prompts(prompt: Any) -> list[dict]:
  """One {'prompt': str} or {'tokens': ids} per prompt."""
  if isinstance(prompt, str):
    return [{'prompt': prompt}]
  if isinstance(prompt, list) and prompt:
    if all(isinstance(p, str) for p in prompt):
      return [{'prompt': p} for p in prompt]
    if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
      return [{'tokens': prompt}]
    if all(isinstance(p, list) for p in prompt):
      return [{'tokens': p} for p in prompt]
  if prompt is None:
    raise ApiError(400, 'prompt: missing; give a string, a list of strings, or token ids', 'prompt')
  raise ApiError(400, 'prompt: must be a non-empty string, list of strings, list of token ids or list of lists '
                 'of token ids', 'prompt')


def _build(body: dict, prompts: list[dict], common: dict, max_tokens: int, logprobs: bool, chat: bool) -> Parsed:
  fields = {k: body[k] for k in _SAMPLING if k in body and body[k] is not None}
  fields.setdefault('max_tokens', max_tokens)
  fields.setdefault('temperature', DEFAULT_TEMPERATURE)
  seed = fields.pop('seed', None)
  if seed is None:
    seed = secrets.randbits(32)
  elif isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
    raise ApiError(400, f'seed: must be an integer in [0, 2**32), got {seed!r}', 'seed')
  defaults = SamplingParams(max_tokens=max_tokens)
  requests = []
  for p in prompts:
    for j in range(common['n']):
      try:
        request = request_from_json({**p, **fields, 'seed': (seed + j) % 2**32, 'logprobs': logprobs}, defaults)
      except ValueError as e:
        raise bad_request(e) from None
      requests.append(request)
  return Parsed(requests=requests, n=common['n'], stream=common['stream'], include_usage=common['include_usage'],
                logprobs=logprobs, chat=chat)


# --- chat templates --------------------------------------------------------------------------------------------


class ChatTemplate:
  """A Hugging Face chat template (Jinja, sandboxed as `transformers` renders it): messages -> prompt text, with
  the generation prompt for the assistant's turn."""

  def __init__(self, source: str, bos_token: str = '', eos_token: str = ''):
    import jinja2  # pylint: disable=g-import-not-at-top  (the `serve` extra)
    from jinja2 import sandbox  # pylint: disable=g-import-not-at-top
    env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals['raise_exception'] = _raise_template_error
    try:
      self._template = env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
      raise ValueError(f'chat template: line {e.lineno}: {e.message}') from None
    self.bos_token, self.eos_token = bos_token, eos_token

  def render(self, messages: Any) -> str:
    messages = _messages(messages)
    try:
      return self._template.render(messages=messages, add_generation_prompt=True, bos_token=self.bos_token,
                                   eos_token=self.eos_token)
    except _TemplateError as e:
      raise ApiError(400, f'messages: {e}', 'messages') from None
    except Exception as e:  # pylint: disable=broad-except  (a template's own bug: the request cannot be served)
      raise ApiError(400, f'messages: the chat template failed on them ({type(e).__name__}: {e})', 'messages') \
          from None


class _TemplateError(Exception):
  pass


def _raise_template_error(message):
  raise _TemplateError(message)


def _messages(messages: Any) -> list[dict]:
  if not isinstance(messages, list) or not messages:
    raise ApiError(400, 'messages: must be a non-empty list of {"role", "content"} objects', 'messages')
  out = []
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or not isinstance(m.get('role'), str):
      raise ApiError(400, f'messages[{i}]: must be an object with a "role" string and "content"', f'messages[{i}]')
    content = m.get('content')
    if isinstance(content, list):  # content parts: only text is understood here
      if not all(isinstance(p, dict) and p.get('type') == 'text' and isinstance(p.get('text'), str)
                 for p in content):
        raise ApiError(400, f'messages[{i}].content: only text parts ({{"type": "text", "text": ...}}) are '
                       'supported', f'messages[{i}].content')
      content = ''.join(p['text'] for p in content)
    if not isinstance(content, str):
      raise ApiError(400, f'messages[{i}].content: must be a string or a list of text parts',
                     f'messages[{i}].content')
    out.append({**m, 'content': content})
  return out


def load_chat_template(model_dir: str | None, path: str | None) -> ChatTemplate | None:
  """From `path` (a Jinja file) if given, else from `model_dir`'s tokenizer_config.json; None if neither has one.
  Raises ValueError naming the flag."""
  config = {}
  if model_dir:
    config_path = os.path.join(model_dir, 'tokenizer_config.json')
    if os.path.isfile(config_path):
      try:
        with open(config_path, encoding='utf-8') as f:
          config = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f'--model_dir: {config_path} is not JSON ({e.msg} at line {e.lineno})') from None
  source = config.get('chat_template')
  if isinstance(source, list):  # several named templates: the default one
    source = next((t.get('template') for t in source if isinstance(t, dict) and t.get('name') == 'default'), None)
  if path:
    if not os.path.isfile(path):
      raise ValueError(f'--chat_template: {path} is not a file')
    with open(path, encoding='utf-8') as f:
      source = f.read()
  if not source:
    return None
  token = lambda v: v.get('content', '') if isinstance(v, dict) else (v or '')
  try:
    return ChatTemplate(source, token(config.get('bos_token')), token(config.get('eos_token')))
  except ValueError as e:
    raise ValueError(f'--chat_template: {e}') from None


# --- responses -------------------------------------------------------------------------------------------------


def new_id(chat: bool) -> str:
  return ('chatcmpl-' if chat else 'cmpl-') + secrets.token_hex(12)


def finish_reason(result: Result) -> str:
  return result.finish_reason if result.finish_reason in ('stop', 'length') else result.finish_reason or 'stop'


def _logprobs(result: Result, codec, chat: bool) -> dict:
  pieces = [codec.decode([t]) for t in result.tokens]
  values = result.logprobs or []
  if chat:
    return {'content': [{'token': p, 'logprob': v, 'bytes': list(p.encode('utf-8')), 'top_logprobs': []}
                        for p, v in zip(pieces, values)]}
  offsets, at = [], 0
  for p in pieces:
    offsets.append(at)
    at += len(p)
  return {'tokens': pieces, 'token_logprobs': values, 'top_logprobs': None, 'text_offset': offsets}


def response(parsed: Parsed, rid: str, model: str, results: list[Result], codec) -> dict:
  """The whole response once every choice has finished."""
  choices = []
  for k, r in enumerate(results):
    choice = {'index': k, 'finish_reason': finish_reason(r),
              'logprobs': _logprobs(r, codec, parsed.chat) if parsed.logprobs else None}
    if parsed.chat:
      choice['message'] = {'role': 'assistant', 'content': r.text}
    else:
      choice['text'] = r.text
    choices.append(choice)
  return {'id': rid, 'object': 'chat.completion' if parsed.chat else 'text_completion', 'created': int(time.time()),
          'model': model, 'choices': choices, 'usage': usage(parsed, results)}


def usage(parsed: Parsed, results: list[Result]) -> dict:
  # The n samples of one prompt share its tokens: count each prompt once, as OpenAI does.
  prompt = sum(r.prompt_tokens for k, r in enumerate(results) if k % parsed.n == 0)
  completion = sum(len(r.tokens) for r in results)
  return {'prompt_tokens': prompt, 'completion_tokens': completion, 'total_tokens': prompt + completion}


def chunk(parsed: Parsed, rid: str, model: str, k: int, text: str, finish: str | None = None,
          token: int | None = None, logprob: float | None = None, codec=None, first: bool = False) -> dict:
  """One server-sent event's data for choice k: a text delta and/or its finish reason."""
  lp = None
  if parsed.logprobs and token is not None:
    lp = _logprobs(Result(index=k, id=rid, tokens=[token], logprobs=[logprob]), codec, parsed.chat)
  if parsed.chat:
    delta = {'role': 'assistant', 'content': text} if first else ({'content': text} if text else {})
    choice = {'index': k, 'delta': delta, 'logprobs': lp, 'finish_reason': finish}
  else:
    choice = {'index': k, 'text': text, 'logprobs': lp, 'finish_reason': finish}
  return {'id': rid, 'object': 'chat.completion.chunk' if parsed.chat else 'text_completion',
          'created': int(time.time()), 'model': model, 'choices': [choice]}


def usage_chunk(parsed: Parsed, rid: str, model: str, results: list[Result]) -> dict:
  return {'id': rid, 'object': 'chat.completion.chunk' if parsed.chat else 'text_completion',
          'created': int(time.time()), 'model': model, 'choices': [], 'usage': usage(parsed, results)}


def sse(data: dict | str) -> bytes:
  return f'data: {data if isinstance(data, str) else json.dumps(data)}\n\n'.encode()
