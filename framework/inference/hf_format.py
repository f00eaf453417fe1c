"""Llama-format directories as Hugging Face writes them: config.json, *.safetensors, tokenizer.json.

    cfg = serving_config('/models/llama')                      # batchax config from config.json
    params = load_params(cfg, '/models/llama', sharder)        # onto the serving (or training) mesh
    engine = engine_from_model_dir(cfg, '/models/llama')       # with the directory's tokenizer
    export(cfg, params, '/tmp/out', codec=ByteCodec())         # back to the same format

The architecture is the one batchax's dense decoder already is (RMSNorm pre-norm, grouped-query attention
without biases, half-split RoPE as in Hugging Face's `rotate_half`, SwiGLU, optional tied embeddings), so the
mapping is a transpose per matrix: Hugging Face's nn.Linear stores [out, in], batchax [in, out] with the heads
as their own axis. What the format can carry that batchax does not (RoPE scaling, attention or MLP biases,
activations other than SiLU, MoE layers) is refused with an error rather than served wrong.
"""
from __future__ import annotations

import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from framework.inference import loading
from framework.mesh import Sharder

CONFIG, TOKENIZER, WEIGHTS = 'config.json', 'tokenizer.json', 'model.safetensors'


# --- config --------------------------------------------------------------------------------------------------------


def read_config(model_dir: str) -> dict:
  path = os.path.join(model_dir, CONFIG)
  if not os.path.isfile(path):
    raise ValueError(f'--model_dir: {model_dir} has no {CONFIG}; expected a Llama-format directory')
  with open(path, encoding='utf-8') as f:
    hf = json.load(f)
  model_type = hf.get('model_type', 'llama')
  if model_type not in ('llama', 'mistral'):
    raise ValueError(f'{CONFIG}: model_type {model_type!r} is not a Llama-architecture model')
  checks = [
      ('hidden_act', hf.get('hidden_act', 'silu') == 'silu', 'only SiLU (SwiGLU) MLPs are supported'),
      ('rope_scaling', not hf.get('rope_scaling'), 'RoPE scaling is not supported; plain RoPE only'),
      ('attention_bias', not hf.get('attention_bias', False), 'attention biases are not supported'),
      ('mlp_bias', not hf.get('mlp_bias', False), 'MLP biases are not supported'),
      ('sliding_window', not hf.get('sliding_window'), 'sliding-window attention is not supported'),
  ]
  for field, ok, why in checks:
    if not ok:
      raise ValueError(f'{CONFIG}: {field}={hf.get(field)!r}: {why}')
  for field in ('hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads', 'vocab_size'):
    if not isinstance(hf.get(field), int):
      raise ValueError(f'{CONFIG}: {field} is missing or not an integer')
  return hf


def serving_config(model_dir: str, base=None):
  """A batchax config for the directory's model: `base`'s sections (mesh, inference, ...; the defaults when
  None) with the model section from config.json. `base`'s model.max_seq_len is kept as the serving context when
  a base is given (at most max_position_embeddings), else max_position_embeddings."""
  from framework import config as config_lib  # pylint: disable=g-import-not-at-top  (config imports inference)
  hf = read_config(model_dir)
  cfg = config_lib.defaults() if base is None else base.copy_and_resolve_references()
  d, heads = hf['hidden_size'], hf['num_attention_heads']
  context = hf.get('max_position_embeddings', 2048)
  if base is not None and base.model.max_seq_len > context:
    raise ValueError(f'model.max_seq_len: {base.model.max_seq_len} is over the model\'s max_position_embeddings '
                     f'{context} ({CONFIG}); lower it')
  head_dim = hf.get('head_dim') or d // heads
  cfg.model.update(
      vocab_size=hf['vocab_size'], d_model=d, n_layers=hf['num_hidden_layers'], n_heads=heads,
      n_kv_heads=hf.get('num_key_value_heads') or heads, head_dim=0 if head_dim * heads == d else head_dim,
      d_ff=hf['intermediate_size'], rope_theta=float(hf.get('rope_theta', 10000.0)),
      norm_eps=float(hf.get('rms_norm_eps', 1e-6)), tie_embeddings=bool(hf.get('tie_word_embeddings', False)),
      max_seq_len=base.model.max_seq_len if base is not None else context)
  cfg.moe.num_experts = 0
  cfg.armt.segment_len = 0
  cfg.data.seq_len = min(cfg.data.seq_len, cfg.model.max_seq_len)
  return cfg


def _hf_config(cfg, codec=None) -> dict:
  m = cfg.model
  from framework.models.config import head_dim  # pylint: disable=g-import-not-at-top
  eos = list(getattr(codec, 'eos_ids', ())) if codec is not None else []
  out = {
      'architectures': ['LlamaForCausalLM'], 'model_type': 'llama', 'hidden_act': 'silu',
      'hidden_size': m.d_model, 'intermediate_size': m.d_ff, 'num_hidden_layers': m.n_layers,
      'num_attention_heads': m.n_heads, 'num_key_value_heads': m.n_kv_heads, 'head_dim': head_dim(m),
      'vocab_size': m.vocab_size, 'max_position_embeddings': m.max_seq_len, 'rms_norm_eps': m.norm_eps,
      'rope_theta': m.rope_theta, 'rope_scaling': None, 'tie_word_embeddings': bool(m.tie_embeddings),
      'attention_bias': False, 'mlp_bias': False, 'torch_dtype': m.param_dtype,
  }
  if eos:
    out['eos_token_id'] = eos[0] if len(eos) == 1 else eos
  bos = getattr(codec, 'bos_id', None)
  if bos is not None:
    out['bos_token_id'] = bos
  return out


# --- weights -------------------------------------------------------------------------------------------------------


def _to_hf(kind: str, x: np.ndarray) -> np.ndarray:
  """One batchax array as Hugging Face stores it. 'T': an [in, ...out] matrix (heads folded into out) becomes
  nn.Linear's [out, in]; 'Tin': an [...in, out] one (attention's output, heads folded into in) the same."""
  if kind == 'T':
    return x.reshape(x.shape[0], -1).T
  if kind == 'Tin':
    return x.reshape(-1, x.shape[-1]).T
  return x


def _from_hf(kind: str, x: np.ndarray, shape: tuple) -> np.ndarray:
  return x.reshape(shape) if kind == 'same' else x.T.reshape(shape)


def _names(cfg) -> dict[str, tuple]:
  """Hugging Face tensor name -> (batchax path, layer index or None, kind for _to_hf)."""
  out = {'model.embed_tokens.weight': (('embedding',), None, 'same'),
         'model.norm.weight': (('final_norm', 'scale'), None, 'same')}
  if not cfg.model.tie_embeddings:
    out['lm_head.weight'] = (('head',), None, 'T')
  per_layer = {
      'self_attn.q_proj.weight': (('attn', 'wq'), 'T'), 'self_attn.k_proj.weight': (('attn', 'wk'), 'T'),
      'self_attn.v_proj.weight': (('attn', 'wv'), 'T'), 'self_attn.o_proj.weight': (('attn', 'wo'), 'Tin'),
      'mlp.gate_proj.weight': (('mlp', 'wi_gate'), 'T'), 'mlp.up_proj.weight': (('mlp', 'wi_up'), 'T'),
      'mlp.down_proj.weight': (('mlp', 'wo'), 'T'),
      'input_layernorm.weight': (('attn_norm', 'scale'), 'same'),
      'post_attention_layernorm.weight': (('mlp_norm', 'scale'), 'same'),
  }
  for layer in range(cfg.model.n_layers):
    for name, (path, kind) in per_layer.items():
      out[f'model.layers.{layer}.{name}'] = (('layers',) + path, layer, kind)
  return out


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _check_dense(cfg) -> None:
  if cfg.moe.num_experts:
    raise ValueError('moe.num_experts: the Llama format holds dense decoders; an MoE model cannot be exported to it')
  if cfg.armt.segment_len:
    raise ValueError('armt.segment_len: the Llama format holds plain decoders; the ARMT model cannot be '
                     'exported to it')


def export(cfg, params, out_dir: str, codec=None) -> None:
  """Writes config.json, model.safetensors and (for the byte codec or a tokenizers-backed codec) tokenizer.json.
  The directory is written whole or not at all: a crash leaves only `out_dir`.tmp."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top  (the `hf` extra)
  _check_dense(cfg)
  if os.path.exists(out_dir):
    raise ValueError(f'export: {out_dir} exists; give a new directory')
  params = jax.device_get(params)
  tensors = {}
  for name, (path, layer, kind) in _names(cfg).items():
    x = np.asarray(_get(params, path))
    x = x if layer is None else x[layer]
    tensors[name] = np.ascontiguousarray(_to_hf(kind, x))
  tmp = out_dir + '.tmp'
  os.makedirs(tmp, exist_ok=False)
  save_file(tensors, os.path.join(tmp, WEIGHTS), metadata={'format': 'pt'})
  with open(os.path.join(tmp, CONFIG), 'w', encoding='utf-8') as f:
    json.dump(_hf_config(cfg, codec), f, indent=2)
  tokenizer = getattr(codec, 'hf_tokenizer', None) or (byte_tokenizer() if codec is not None else None)
  if tokenizer is not None:
    tokenizer.save(os.path.join(tmp, TOKENIZER))
  os.replace(tmp, out_dir)


def load_params(cfg, model_dir: str, sharder: Sharder):
  """The directory's weights as batchax parameters in model.param_dtype, placed on `sharder`'s shardings."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top  (the `hf` extra)
  _check_dense(cfg)
  files = sorted(glob.glob(os.path.join(model_dir, '*.safetensors')))
  if not files:
    raise ValueError(f'--model_dir: {model_dir} has no *.safetensors files')
  abstract = loading.abstract_params(cfg, sharder)
  names = _names(cfg)
  layers: dict[tuple, list] = {}
  out = jax.tree.map(lambda _: None, abstract)
  seen = set()
  for path in files:
    with safe_open(path, framework='flax') as f:
      for name in f.keys():
        if name not in names:
          if name.endswith('rotary_emb.inv_freq'):
            continue  # older exports store RoPE's frequencies, which batchax recomputes
          if name == 'lm_head.weight' and cfg.model.tie_embeddings:
            continue  # many tied checkpoints also store the head; it is the embedding
          raise ValueError(f'{os.path.basename(path)}: tensor {name} is not part of a Llama model with this '
                           f'{CONFIG} (tie_word_embeddings={cfg.model.tie_embeddings})')
        bx_path, layer, kind = names[name]
        target = _get(abstract, bx_path)
        shape = target.shape if layer is None else target.shape[1:]
        x = np.asarray(f.get_tensor(name).astype(jnp.float32))
        expected = _to_hf(kind, np.zeros(shape, np.float32)).shape
        if x.shape != expected:
          raise ValueError(f'tensor {name}: shape {x.shape} but {CONFIG} implies {expected}')
        x = _from_hf(kind, x, shape)
        seen.add(name)
        if layer is None:
          _set(out, bx_path, jax.device_put(x.astype(target.dtype), target.sharding))
        else:
          layers.setdefault(bx_path, [None] * cfg.model.n_layers)[layer] = x.astype(target.dtype)
  missing = sorted(set(names) - seen)
  if missing:
    raise ValueError(f'--model_dir: {model_dir} lacks {len(missing)} tensors of the model, e.g. {missing[0]}')
  for bx_path, stack in layers.items():
    _set(out, bx_path, jax.device_put(np.stack(stack), _get(abstract, bx_path).sharding))
  return out


def _set(tree, path, value):
  for key in path[:-1]:
    tree = tree[key]
  tree[path[-1]] = value


# --- tokenizer -----------------------------------------------------------------------------------------------------


class TokenizerCodec:
  """A `tokenizers` tokenizer.json as the engine's codec (prompts encoded with the tokenizer's own special
  tokens, e.g. Llama's BOS; outputs decoded without specials)."""

  def __init__(self, tokenizer, vocab_size: int, eos_ids, bos_id=None):
    self.hf_tokenizer, self.vocab_size = tokenizer, vocab_size
    self.eos_ids, self.bos_id = tuple(eos_ids), bos_id

  def encode(self, text: str) -> list[int]:
    return self.hf_tokenizer.encode(text).ids

  def encode_chat(self, text: str) -> list[int]:
    # A chat template writes the special tokens itself (e.g. "{{ bos_token }}"), as transformers assumes.
    return self.hf_tokenizer.encode(text, add_special_tokens=False).ids

  def decode(self, ids) -> str:
    return self.hf_tokenizer.decode(list(ids), skip_special_tokens=True)


def codec_from_model_dir(model_dir: str) -> TokenizerCodec:
  from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top  (the `hf` extra)
  hf = read_config(model_dir)
  path = os.path.join(model_dir, TOKENIZER)
  if not os.path.isfile(path):
    raise ValueError(f'--model_dir: {model_dir} has no {TOKENIZER}; prompts need it (a directory without one can '
                     'still serve "tokens" requests through the Python API)')
  eos = hf.get('eos_token_id')
  eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
  return TokenizerCodec(Tokenizer.from_file(path), hf['vocab_size'], eos, hf.get('bos_token_id'))


def byte_tokenizer():
  """batchax's byte tokenizer (framework/tokenizer.py: PAD 0, BOS 1, EOS 2, byte b -> b + 3) as a `tokenizers`
  tokenizer, so an exported byte-level model loads with its tokenizer anywhere tokenizer.json is read."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors  # pylint: disable=g-import-not-at-top
  from framework.tokenizer import ByteTokenizer  # pylint: disable=g-import-not-at-top
  to_unicode = pre_tokenizers.ByteLevel.alphabet()
  # ByteLevel maps byte b to a printable character; list them in byte order so that byte b gets id b + 3.
  byte_chars = _byte_level_chars()
  assert set(byte_chars) == set(to_unicode)
  vocab = {'<pad>': ByteTokenizer.PAD_ID, '<s>': ByteTokenizer.BOS_ID, '</s>': ByteTokenizer.EOS_ID}
  vocab.update({c: b + ByteTokenizer.NUM_SPECIAL for b, c in enumerate(byte_chars)})
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens(['<pad>', '<s>', '</s>'])
  tok.post_processor = processors.TemplateProcessing(single='<s> $A', special_tokens=[('<s>', ByteTokenizer.BOS_ID)])
  return tok


def _byte_level_chars() -> list[str]:
  """GPT-2's byte-to-character table, which `tokenizers`' ByteLevel uses: printable bytes map to themselves, the
  others to 256 + n in order."""
  printable = list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1)) + \
      list(range(ord('®'), ord('ÿ') + 1))
  chars, extra = {}, 0
  for b in range(256):
    if b in printable:
      chars[b] = chr(b)
    else:
      chars[b] = chr(256 + extra)
      extra += 1
  return [chars[b] for b in range(256)]


def engine_from_model_dir(cfg, model_dir: str, devices=None, draft=None):
  """`draft`: (draft config, its batchax workdir) for speculative decoding."""
  from framework.inference.engine import Engine, serving_sharder  # pylint: disable=g-import-not-at-top
  sharder = serving_sharder(cfg, devices)
  codec = codec_from_model_dir(model_dir)
  return Engine(cfg, load_params(cfg, model_dir, sharder), codec=codec, sharder=sharder,
                draft=loading.draft_from_workdir(draft, sharder))
