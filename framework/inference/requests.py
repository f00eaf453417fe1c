"""What goes into the engine and what comes out: requests, streamed events, results, and the text codecs.

A request is checked on arrival; a bad one (empty prompt, too long for the context, ids outside the vocabulary,
a bad sampling field) becomes an error result naming the field, and the other requests carry on.
"""
from __future__ import annotations

import codecs
import dataclasses
from typing import Any, Protocol

from framework.inference.sampling import SamplingParams
from framework.tokenizer import ByteTokenizer


class Codec(Protocol):
  eos_ids: tuple[int, ...]  # a sampled one ends the request with 'stop' (unless ignore_eos)
  vocab_size: int

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids) -> str: ...

  def encode_chat(self, text: str) -> list[int]:
    """A prompt rendered by a chat template (framework/inference/openai_api.py)."""

  # Optional: `text_stream()` -> an object with push(token) and decoded() equal to decode(tokens pushed), which
  # the engine then uses instead of decoding a request's whole output at every token (ByteCodec has one).


class ByteCodec:
  """The byte tokenizer batchax models train on: a prompt is BOS + its UTF-8 bytes (no EOS: the model goes on)."""

  def __init__(self):
    self._tok = ByteTokenizer()
    self.eos_ids, self.vocab_size = (ByteTokenizer.EOS_ID,), ByteTokenizer.vocab_size

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_bos=True, add_eos=False).tolist()

  def encode_chat(self, text: str) -> list[int]:
    return self.encode(text)  # the byte tokenizer has no special-token text for a template to write: BOS added

  def decode(self, ids) -> str:
    return self._tok.decode(ids)

  def text_stream(self) -> 'ByteTextStream':
    return ByteTextStream()


class ByteTextStream:
  """`ByteCodec.decode(generated)` kept up to date one token at a time, so a long output costs O(1) per token
  rather than a decode of everything so far. UTF-8 is decoded incrementally (with errors='replace', the same state
  machine as the whole decode); bytes of an unfinished character wait, and `decoded()` shows them as the one
  U+FFFD the whole decode would end with."""

  def __init__(self):
    self._decoder = codecs.getincrementaldecoder('utf-8')(errors='replace')
    self.text = ''

  def push(self, token: int) -> None:
    if ByteTokenizer.NUM_SPECIAL <= token < ByteTokenizer.vocab_size:  # specials are skipped, as decode does
      self.text += self._decoder.decode(bytes([token - ByteTokenizer.NUM_SPECIAL]))

  def decoded(self) -> str:
    """What decode() of every token pushed so far returns."""
    return self.text + ('\ufffd' if self._decoder.getstate()[0] else '')


@dataclasses.dataclass
class Request:
  """`prompt` (text) or `tokens` (ids); `id` defaults to the request's index in its batch."""
  prompt: str | None = None
  tokens: list[int] | None = None
  id: str | None = None
  sampling: SamplingParams | None = None


@dataclasses.dataclass
class Event:
  """One step of one request: a new token (with its text delta and logprob), and/or its end."""
  index: int
  id: str
  token: int | None = None
  text: str = ''
  logprob: float | None = None
  finished: bool = False
  finish_reason: str | None = None  # 'stop' (EOS or a stop string) | 'length' | 'error'
  error: str | None = None


@dataclasses.dataclass
class Result:
  index: int
  id: str
  text: str = ''
  tokens: list[int] = dataclasses.field(default_factory=list)
  finish_reason: str | None = None
  error: str | None = None
  logprobs: list[float] | None = None
  prompt_tokens: int = 0
  time_to_first_token: float | None = None  # seconds from arrival
  time_between_tokens: list[float] = dataclasses.field(default_factory=list)
  latency: float | None = None  # seconds from arrival to the last token
  preemptions: int = 0

  def to_json(self) -> dict[str, Any]:
    out = {'id': self.id, 'text': self.text, 'tokens': self.tokens, 'finish_reason': self.finish_reason,
           'prompt_tokens': self.prompt_tokens, 'time_to_first_token': self.time_to_first_token,
           'latency': self.latency, 'preemptions': self.preemptions}
    if self.error is not None:
      out['error'] = self.error
    if self.logprobs is not None:
      out['logprobs'] = self.logprobs
    return out


def prompt_ids(request: Request, codec: Codec, vocab_size: int, max_seq_len: int) -> list[int]:
  """The request's prompt as ids; raises ValueError naming the field."""
  if request.prompt is not None and request.tokens is not None:
    raise ValueError('prompt, tokens: give one of them, not both')
  if request.tokens is not None:
    ids = request.tokens
    if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
      raise ValueError('tokens: must be a list of integer token ids')
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
      raise ValueError(f'tokens: ids {bad[:5]} are outside the vocabulary [0, {vocab_size})')
    ids = list(ids)
  elif request.prompt is not None:
    if not isinstance(request.prompt, str):
      raise ValueError(f'prompt: must be a string, got {type(request.prompt).__name__}')
    if not request.prompt:
      raise ValueError('prompt: is empty; give at least one character')
    ids = codec.encode(request.prompt)
  else:
    raise ValueError('prompt: missing; give a prompt (text) or tokens (ids)')
  if not ids:
    raise ValueError('tokens: is empty; give at least one token')
  if len(ids) >= max_seq_len:
    raise ValueError(f'prompt: {len(ids)} tokens leave no room to generate in the model\'s context of '
                     f'{max_seq_len} (model.max_seq_len); shorten the prompt to at most {max_seq_len - 1} tokens')
  return ids


# The fields of a request object (a prompts.jsonl line, an HTTP body), named as in the OpenAI API.
SAMPLING_FIELDS = ('max_tokens', 'temperature', 'top_p', 'top_k', 'seed', 'stop', 'logprobs', 'ignore_eos')
REQUEST_FIELDS = ('prompt', 'tokens', 'id') + SAMPLING_FIELDS


def request_from_json(obj: Any, defaults: SamplingParams) -> Request:
  """A Request from a JSON object; fields it leaves out come from `defaults`. Raises ValueError naming the field
  (the values themselves are checked when the engine takes the request)."""
  if not isinstance(obj, dict):
    raise ValueError(f'request: must be a JSON object with "prompt" or "tokens", got {type(obj).__name__}')
  unknown = sorted(set(obj) - set(REQUEST_FIELDS))
  if unknown:
    raise ValueError(f'{unknown[0]}: unknown field; a request takes {", ".join(REQUEST_FIELDS)}')
  overrides = {k: obj[k] for k in SAMPLING_FIELDS if k in obj}
  if 'stop' in overrides:
    stop = overrides['stop']
    stop = [stop] if isinstance(stop, str) else stop
    if stop is None:
      stop = []
    if not isinstance(stop, list) or not all(isinstance(x, str) for x in stop):
      raise ValueError(f'stop: must be a string or a list of strings, got {overrides["stop"]!r}')
    overrides['stop'] = tuple(stop)
  for name in ('logprobs', 'ignore_eos'):
    if name in overrides and not isinstance(overrides[name], bool):
      raise ValueError(f'{name}: must be true or false, got {overrides[name]!r}')
  rid = obj.get('id')
  if rid is not None and not isinstance(rid, (str, int)):
    raise ValueError(f'id: must be a string or an integer, got {rid!r}')
  return Request(prompt=obj.get('prompt'), tokens=obj.get('tokens'), id=None if rid is None else str(rid),
                 sampling=dataclasses.replace(defaults, **overrides))
