"""Llama-format export and import, checked against a Llama forward pass written here from Hugging Face's
definition (nn.Linear's x @ W.T, rotate_half RoPE, RMSNorm times weight, grouped-query attention, SiLU gate)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import configs.lm_tiny as lm_tiny
from framework import config as config_lib
from framework.inference import hf_format
from framework.inference.engine import Engine, serving_sharder
from framework.inference.requests import ByteCodec, Request
from framework.inference.sampling import SamplingParams
from framework.mesh import make_sharder
from framework.tokenizer import ByteTokenizer
from framework.train import Trainer

pytest.importorskip('safetensors')
pytest.importorskip('tokenizers')


def small_cfg(tie=False):
  cfg = lm_tiny.get_config()
  cfg.model.update(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, max_seq_len=64, tie_embeddings=tie,
                   rope_theta=500.0, norm_eps=1e-5)
  cfg.data.seq_len = 64
  cfg.inference.update(slots=2, page_size=8, prefill_chunk=16, kv_pages=17)
  config_lib.validate(cfg, num_devices=1)
  return cfg


def random_params(cfg, seed=0):
  trainer = Trainer(cfg, make_sharder(cfg, jax.devices()[:1]))
  params = jax.device_get(trainer.init(jax.random.key(seed)).params)
  # Norm weights of one are a special case that would hide a mix-up of the two norms: perturb them.
  rng = np.random.default_rng(seed)
  for norm in ('attn_norm', 'mlp_norm'):
    params['layers'][norm]['scale'] = 1 + 0.3 * rng.standard_normal(params['layers'][norm]['scale'].shape)
  params['final_norm']['scale'] = 1 + 0.3 * rng.standard_normal(params['final_norm']['scale'].shape)
  return jax.tree.map(lambda x: np.asarray(x, np.float32), params), trainer


def llama_logits(model_dir, tokens):
  """Hugging Face LlamaForCausalLM's forward pass in numpy, from the directory alone."""
  from safetensors.numpy import load_file
  hf = json.load(open(os.path.join(model_dir, 'config.json')))
  w = load_file(os.path.join(model_dir, 'model.safetensors'))
  h, kv, hd = hf['num_attention_heads'], hf['num_key_value_heads'], hf['head_dim']
  eps, theta = hf['rms_norm_eps'], hf['rope_theta']
  n = len(tokens)

  def norm(x, weight):
    return weight * (x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps))

  inv_freq = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
  freqs = np.outer(np.arange(n), inv_freq)
  emb = np.concatenate([freqs, freqs], -1)
  cos, sin = np.cos(emb)[:, None], np.sin(emb)[:, None]

  def rotate_half(x):
    return np.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], -1)

  x = w['model.embed_tokens.weight'][tokens]
  for i in range(hf['num_hidden_layers']):
    p = lambda name: w[f'model.layers.{i}.{name}']
    y = norm(x, p('input_layernorm.weight'))
    q = (y @ p('self_attn.q_proj.weight').T).reshape(n, h, hd)
    k = (y @ p('self_attn.k_proj.weight').T).reshape(n, kv, hd)
    v = (y @ p('self_attn.v_proj.weight').T).reshape(n, kv, hd)
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    k, v = np.repeat(k, h // kv, axis=1), np.repeat(v, h // kv, axis=1)
    scores = np.einsum('qhd,khd->hqk', q, k) / np.sqrt(hd)
    scores = np.where(np.tril(np.ones((n, n), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    x = x + np.einsum('hqk,khd->qhd', probs, v).reshape(n, h * hd) @ p('self_attn.o_proj.weight').T
    y = norm(x, p('post_attention_layernorm.weight'))
    gate, up = y @ p('mlp.gate_proj.weight').T, y @ p('mlp.up_proj.weight').T
    x = x + (gate / (1 + np.exp(-gate)) * up) @ p('mlp.down_proj.weight').T
  x = norm(x, w['model.norm.weight'])
  head = w['model.embed_tokens.weight'] if hf['tie_word_embeddings'] else w['lm_head.weight']
  return x @ head.T


@pytest.mark.parametrize('tie', [False, True], ids=['untied', 'tied'])
def test_export_matches_a_llama_forward_and_loads_back(tmp_path, tie):
  cfg = small_cfg(tie)
  params, trainer = random_params(cfg)
  out = str(tmp_path / 'llama')
  hf_format.export(cfg, params, out, codec=ByteCodec())
  assert sorted(os.listdir(out)) == ['config.json', 'model.safetensors', 'tokenizer.json']
  tokens = np.random.default_rng(1).integers(3, 259, 20)
  ours = trainer.model.apply({'params': params}, jnp.asarray(tokens[None]), jnp.arange(20)[None],
                             jnp.ones((1, 20), jnp.int32))[0][0]
  np.testing.assert_allclose(np.asarray(ours), llama_logits(out, tokens), atol=1e-4, rtol=1e-4)
  # Loading back gives the same arrays, and a config with the same model.
  loaded_cfg = hf_format.serving_config(out)
  for field in ('vocab_size', 'd_model', 'n_layers', 'n_heads', 'n_kv_heads', 'd_ff', 'tie_embeddings',
                'rope_theta', 'norm_eps', 'max_seq_len'):
    assert loaded_cfg.model[field] == cfg.model[field], field
  if tie:  # many tied checkpoints also store the head: it is skipped, not refused
    from safetensors.numpy import load_file, save_file
    tensors = load_file(os.path.join(out, 'model.safetensors'))
    tensors['lm_head.weight'] = tensors['model.embed_tokens.weight']
    save_file(tensors, os.path.join(out, 'model.safetensors'))
  loaded = hf_format.load_params(cfg, out, serving_sharder(cfg, jax.devices()[:1]))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded), params)


def test_byte_tokenizer_export_encodes_like_batchax():
  tok = hf_format.byte_tokenizer()
  ours = ByteTokenizer()
  for text in ['hello world', '  two  spaces\nand\ttabs', 'ünïcödé ✓ 漢字', '\x00\x01 control', '']:
    ids = ours.encode(text, add_bos=True, add_eos=False).tolist()
    assert tok.encode(text).ids == ids, text
    assert tok.decode(ids, skip_special_tokens=True) == text


@pytest.mark.slow  # launch.generate --model_dir covers it by default (tests/test_generate_cli.py)
def test_engine_serves_a_model_dir_like_the_params_it_came_from(tmp_path):
  cfg = small_cfg()
  params, _ = random_params(cfg, seed=2)
  out = str(tmp_path / 'llama')
  hf_format.export(cfg, params, out, codec=ByteCodec())
  served_cfg = hf_format.serving_config(out, cfg)
  config_lib.validate(served_cfg, num_devices=1)
  from_dir = hf_format.engine_from_model_dir(served_cfg, out, jax.devices()[:1])
  direct = Engine(cfg, params, sharder=serving_sharder(cfg, jax.devices()[:1]))
  reqs = [Request(prompt=p, sampling=SamplingParams(max_tokens=8)) for p in ('hello', 'the cat sat', 'x')]
  a, b = from_dir.generate(reqs), direct.generate(reqs)
  assert [r.tokens for r in a] == [r.tokens for r in b]
  assert [r.text for r in a] == [r.text for r in b]
  assert from_dir.codec.eos_ids == (ByteTokenizer.EOS_ID,)


def test_bad_model_dirs_get_clear_errors(tmp_path):
  cfg = small_cfg()
  params, _ = random_params(cfg)
  out = str(tmp_path / 'llama')
  hf_format.export(cfg, params, out, codec=ByteCodec())
  with pytest.raises(ValueError, match='exists'):
    hf_format.export(cfg, params, out)
  with pytest.raises(ValueError, match='has no config.json'):
    hf_format.serving_config(str(tmp_path))
  hf = json.load(open(os.path.join(out, 'config.json')))
  for field, value, message in [('rope_scaling', {'rope_type': 'llama3', 'factor': 8.0}, 'RoPE scaling'),
                                ('model_type', 'gpt2', 'not a Llama'), ('attention_bias', True, 'biases')]:
    bad = dict(hf, **{field: value})
    json.dump(bad, open(os.path.join(out, 'config.json'), 'w'))
    with pytest.raises(ValueError, match=message):
      hf_format.serving_config(out)
  json.dump(dict(hf, num_hidden_layers=3), open(os.path.join(out, 'config.json'), 'w'))
  with pytest.raises(ValueError, match='lacks'):
    hf_format.load_params(hf_format.serving_config(out, cfg), out, serving_sharder(cfg, jax.devices()[:1]))
  json.dump(dict(hf, hidden_size=32), open(os.path.join(out, 'config.json'), 'w'))
  with pytest.raises(ValueError, match='shape'):
    wrong = hf_format.serving_config(out, cfg)
    hf_format.load_params(wrong, out, serving_sharder(wrong, jax.devices()[:1]))
  moe = small_cfg()
  moe.moe.update(num_experts=4, d_ff_expert=32)
  with pytest.raises(ValueError, match='moe.num_experts'):
    hf_format.export(moe, params, str(tmp_path / 'moe'))
