"""The OpenAI request parsing and response shaping (framework/inference/openai_api.py), without HTTP: prompt
forms, choice order and seeds, refused fields, chat templates from a model directory, usage counting."""
import json

import pytest

from framework.inference import hf_format, openai_api
from framework.inference.openai_api import ApiError
from framework.inference.requests import ByteCodec, Result


def parse(body):
  return openai_api.parse_completion(body, 'm', max_tokens=20)


def test_prompt_forms_choice_order_and_seeds():
  p = parse({'prompt': ['a', 'b'], 'n': 3, 'seed': 2**32 - 2, 'temperature': 0.5})
  assert [r.prompt for r in p.requests] == ['a'] * 3 + ['b'] * 3  # choice k = prompt i * n + j
  assert [r.sampling.seed for r in p.requests[:3]] == [2**32 - 2, 2**32 - 1, 0]  # seed + j, wrapped
  assert all(r.sampling.max_tokens == 20 and r.sampling.temperature == 0.5 for r in p.requests)
  assert parse({'prompt': [1, 2, 3]}).requests[0].tokens == [1, 2, 3]
  assert [r.tokens for r in parse({'prompt': [[1], [2, 3]]}).requests] == [[1], [2, 3]]
  default = parse({'prompt': 'x'}).requests[0].sampling
  assert default.temperature == openai_api.DEFAULT_TEMPERATURE == 1.0
  seeds = {parse({'prompt': 'x'}).requests[0].sampling.seed for _ in range(8)}
  assert len(seeds) > 1  # no seed given: a fresh one per request
  assert parse({'prompt': 'x', 'stop': 'ab'}).requests[0].sampling.stop == ('ab',)
  assert parse({'prompt': 'x', 'presence_penalty': 0, 'user': 'u', 'logprobs': 0}).logprobs


@pytest.mark.parametrize('body, status, param', [
    ({'prompt': 'x', 'frequency_penalty': 1.0}, 400, 'frequency_penalty'),
    ({'prompt': 'x', 'echo': True}, 400, 'echo'),
    ({'prompt': 'x', 'n': True}, 400, 'n'),
    ({'prompt': 'x', 'stream': 'yes'}, 400, 'stream'),
    ({'prompt': 'x', 'stream': True, 'stream_options': {'include_usage': 1}}, 400, 'stream_options'),
    ({'prompt': 'x', 'seed': -1}, 400, 'seed'),
    ({'prompt': 'x', 'stop': [1]}, 400, 'stop'),
    ({'prompt': [1, 'a']}, 400, 'prompt'),
    ({'prompt': []}, 400, 'prompt'),
    ({}, 400, 'prompt'),
    ({'prompt': 'x', 'model': 'n'}, 404, 'model'),
])
def test_bad_fields_are_named(body, status, param):
  with pytest.raises(ApiError) as e:
    parse(body)
  assert e.value.status == status and e.value.param == param and e.value.message.startswith(param)


def test_chat_template_from_a_model_directory(tmp_path):
  template = ("{{ bos_token }}{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tools') }}"
              "{% endif %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<assistant>"
              "{% endif %}")
  (tmp_path / 'tokenizer_config.json').write_text(json.dumps(
      {'chat_template': template, 'bos_token': {'content': '<s>'}, 'eos_token': '</s>'}))
  chat = openai_api.load_chat_template(str(tmp_path), None)
  assert chat.render([{'role': 'user', 'content': 'hi'}]) == '<s><user>hi<assistant>'
  tok = hf_format.byte_tokenizer()
  codec = hf_format.TokenizerCodec(tok, 259, [2], 1)
  parsed = openai_api.parse_chat({'messages': [{'role': 'user', 'content': 'hi'}], 'max_tokens': 3}, 'm', 20,
                                 chat, codec)
  # The template wrote the BOS; the tokenizer must not add another (transformers' convention).
  assert parsed.requests[0].tokens == [1] + [b + 3 for b in b'<user>hi<assistant>']
  with pytest.raises(ApiError, match='messages: no tools'):
    chat.render([{'role': 'tool', 'content': 'x'}])
  for bad in ([], [{'content': 'x'}], [{'role': 'user', 'content': [{'type': 'image_url'}]}], 'hi'):
    with pytest.raises(ApiError, match='^messages'):
      chat.render(bad)
  assert openai_api.load_chat_template(str(tmp_path / 'none'), None) is None
  with pytest.raises(ApiError, match='no chat template'):
    openai_api.parse_chat({'messages': []}, 'm', 20, None, ByteCodec())
  broken = tmp_path / 'broken.jinja'
  broken.write_text('{% for %}')
  with pytest.raises(ValueError, match='--chat_template: chat template: line 1'):
    openai_api.load_chat_template(None, str(broken))


def test_response_and_usage_count_each_prompt_once():
  p = parse({'prompt': ['ab', 'c'], 'n': 2, 'logprobs': 0})
  results = [Result(index=k, id=str(k), text=t, tokens=[5] * len(t), finish_reason='length', logprobs=[-1.0] * len(t),
                    prompt_tokens=3 if k < 2 else 2) for k, t in enumerate(['x', 'yy', 'z', ''])]
  body = openai_api.response(p, 'cmpl-1', 'm', results, ByteCodec())
  assert body['usage'] == {'prompt_tokens': 5, 'completion_tokens': 4, 'total_tokens': 9}
  assert [c['text'] for c in body['choices']] == ['x', 'yy', 'z', '']
  assert body['choices'][1]['logprobs']['token_logprobs'] == [-1.0, -1.0]
  assert body['choices'][1]['logprobs']['text_offset'] == [0, 1]
