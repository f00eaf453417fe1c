"""The config schema (every field with its default) and `validate`, run once before anything compiles.

Config files start from `defaults()` and change fields; a key that is not in the schema is an error, so a typo
never silently trains with a default.
"""
from __future__ import annotations

import math
from typing import Any

import ml_collections

ATTENTION_IMPLS = ('xla', 'pallas', 'cudnn', 'auto')
REMAT_POLICIES = ('none', 'full', 'dots', 'dots_no_batch')
DTYPES = ('float32', 'bfloat16', 'float16')
OPTIMIZERS = ('adamw', 'lamb', 'lars', 'sgd')
SCHEDULES = ('cosine', 'wsd', 'constant')
ICI_AXES = ('data', 'fsdp', 'expert', 'tensor')

# Logical axis name -> mesh axes. Parameters use 'embed' (FSDP-sharded); activations use 'act_embed' so the
# batch can take the fsdp axis without colliding with the parameter rule.
DEFAULT_AXIS_RULES = (
    ('batch', ('data', 'fsdp', 'expert')),
    ('embed', 'fsdp'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('mlp', 'tensor'),
    ('vocab', 'tensor'),
    ('expert', 'expert'),
    ('layers', None),
    ('seq', None),
    ('head_dim', None),
    ('act_embed', None),
)


def defaults() -> ml_collections.ConfigDict:
  """Every config field with its default value. Config files override these."""
  cfg = ml_collections.ConfigDict()
  cfg.seed = 0

  cfg.model = ml_collections.ConfigDict(dict(
      vocab_size=512,        # >= the tokenizer's 259; a multiple of 128 tiles well
      d_model=256,
      n_layers=4,
      n_heads=4,
      n_kv_heads=4,          # < n_heads gives grouped-query attention
      head_dim=0,            # 0: d_model // n_heads
      d_ff=1024,
      max_seq_len=1024,
      rope_theta=10000.0,
      norm_eps=1e-5,
      init_std=0.02,
      tie_embeddings=False,
      param_dtype='float32',
      dtype='float32',       # compute dtype
      remat_policy='none',   # none | full | dots | dots_no_batch
      attention_impl='xla',  # xla | pallas | cudnn | auto
  ))

  cfg.data = ml_collections.ConfigDict(dict(
      source='embedded',     # embedded | text | jsonl | array
      path='',               # glob (text, jsonl) or .npy file (array)
      jsonl_field='text',
      bos_id=1,              # document start marker in 'array' sources
      heldout_fraction=0.05,
      max_corpus_bytes=16_000_000,
      seq_len=256,
      prefetch=2,
  ))

  cfg.train = ml_collections.ConfigDict(dict(
      steps=200,
      batch_size=16,         # global, in sequences
      micro_batches=1,       # gradient accumulation
      z_loss=1e-4,
      log_every=10,
      eval_every=100,        # 0: never
      eval_batches=4,
      micro_grad_norms=False,  # log each micro-batch's gradient norm
  ))

  cfg.optim = ml_collections.ConfigDict(dict(
      name='adamw',          # adamw | lamb | lars | sgd
      lr=1e-3,
      schedule='cosine',     # cosine | wsd | constant, all after a linear warmup
      warmup_steps=20,
      decay_fraction=0.2,    # wsd: final fraction of steps spent decaying
      min_lr_ratio=0.1,
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      weight_decay=0.1,
      momentum=0.9,          # sgd, lars
      grad_clip=1.0,         # 0: off
  ))

  cfg.mesh = ml_collections.ConfigDict(dict(
      data=-1, fsdp=1, expert=1, tensor=1,              # ICI sizes; -1 fills with the remaining devices
      dcn_data=1, dcn_fsdp=1, dcn_expert=1, dcn_tensor=1,  # across slices / hosts (multi-slice)
      axis_rules=DEFAULT_AXIS_RULES,
  ))

  cfg.checkpoint = ml_collections.ConfigDict(dict(
      enabled=True,
      every_steps=100,
      keep_last=3,
      keep_every=0,          # also keep every K-th step forever; 0: off
      async_save=True,
  ))

  cfg.metrics = ml_collections.ConfigDict(dict(
      tensorboard=True,
      peak_flops_per_device=0.0,  # 0: look up the device, or measure a matmul on CPU
  ))
  return cfg


def head_dim(model_cfg) -> int:
  return model_cfg.head_dim or model_cfg.d_model // model_cfg.n_heads


def cudnn_supports(dtype: str, head_size: int) -> bool:
  """Whether cuDNN's fused attention (through jax.nn.dot_product_attention) takes this dtype and head dim."""
  return dtype in ('bfloat16', 'float16') and head_size % 8 == 0 and head_size <= 128


def rule_axes(axes) -> tuple[str, ...]:
  """A rule's mesh axes (None, one name or a sequence of names) as a tuple."""
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def shard_count(rules, sizes: dict[str, int], name: str) -> tuple[int, tuple[str, ...]]:
  """How many shards the first rule for logical axis `name` splits it into, and over which mesh axes."""
  for rule_name, axes in rules:
    if rule_name == name:
      axes = rule_axes(axes)
      return math.prod(sizes[a] for a in axes), axes
  return 1, ()


def _fail(field: str, message: str):
  raise ValueError(f'config {field}: {message}')


def _check_keys(cfg, schema, prefix: str = '') -> None:
  for key in cfg.keys():
    field = f'{prefix}{key}'
    if key not in schema:
      known = ', '.join(sorted(schema.keys()))
      _fail(field, f'unknown config key; known keys here: {known}')
    value, default = cfg[key], schema[key]
    if isinstance(default, ml_collections.ConfigDict):
      if not isinstance(value, ml_collections.ConfigDict):
        _fail(field, f'must be a section, got {type(value).__name__}')
      _check_keys(value, default, field + '.')
    elif isinstance(default, bool):
      if not isinstance(value, bool):
        _fail(field, f'must be True or False, got {value!r}')
    elif isinstance(default, (int, float)) and not isinstance(default, bool):
      if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(field, f'must be a number, got {value!r}')
      if isinstance(default, int) and not float(value).is_integer():
        _fail(field, f'must be an integer, got {value!r}')
    elif isinstance(default, str) and not isinstance(value, str):
      _fail(field, f'must be a string, got {value!r}')
  for key in schema.keys():
    if key not in cfg:
      _fail(f'{prefix}{key}', 'missing; start config files from framework.config.defaults()')


def _one_of(field: str, value: Any, allowed: tuple) -> None:
  if value not in allowed:
    _fail(field, f'{value!r} is not one of {allowed}')


def _positive(cfg, section: str, *names: str) -> None:
  for name in names:
    if cfg[section][name] <= 0:
      _fail(f'{section}.{name}', f'must be > 0, got {cfg[section][name]}')


def mesh_sizes(mesh_cfg, num_devices: int) -> dict[str, int]:
  """ICI size per mesh axis (after filling -1) times its DCN size; raises on sizes that do not fit."""
  dcn = {a: mesh_cfg[f'dcn_{a}'] for a in ICI_AXES}
  for axis, size in dcn.items():
    if size < 1:
      _fail(f'mesh.dcn_{axis}', f'must be >= 1, got {size}')
  n_dcn = math.prod(dcn.values())
  if num_devices % n_dcn:
    _fail('mesh.dcn_*', f'the DCN sizes multiply to {n_dcn}, which does not divide the {num_devices} devices')
  per_slice = num_devices // n_dcn
  ici = {a: mesh_cfg[a] for a in ICI_AXES}
  fill = [a for a, s in ici.items() if s == -1]
  for axis, size in ici.items():
    if size == 0 or size < -1:
      _fail(f'mesh.{axis}', f'must be >= 1 or -1 (fill), got {size}')
  if len(fill) > 1:
    _fail(f'mesh.{fill[1]}', f'only one axis may be -1, got -1 for {fill}')
  known = math.prod(s for s in ici.values() if s != -1)
  if fill:
    if per_slice % known:
      _fail(f'mesh.{fill[0]}', f'cannot fill: the other ICI axes multiply to {known}, which does not divide '
            f'{per_slice} devices per slice')
    ici[fill[0]] = per_slice // known
  elif known != per_slice:
    sizes = ' x '.join(f'{a}={s}' for a, s in ici.items())
    _fail('mesh', f'ICI sizes {sizes} multiply to {known} but there are {per_slice} devices per slice '
          f'({num_devices} devices / {n_dcn} DCN); set one axis to -1 to fill, or fix the sizes')
  return {a: ici[a] * dcn[a] for a in ICI_AXES}


def _check_rules(rules) -> None:
  try:
    pairs = [(name, axes) for name, axes in rules]
  except (TypeError, ValueError):
    _fail('mesh.axis_rules', 'must be a sequence of (logical_name, mesh_axes) pairs')
  for name, axes in pairs:
    for axis in rule_axes(axes):
      if axis not in ICI_AXES:
        _fail('mesh.axis_rules', f'rule for {name!r} names mesh axis {axis!r}; mesh axes are {ICI_AXES}')


def validate(cfg, *, num_devices: int, backend: str = 'cpu') -> dict[str, int]:
  """Checks every field once, before any compile. Returns the resolved mesh sizes.

  Raises ValueError naming the field and the fix.
  """
  _check_keys(cfg, defaults())
  m, d, t, o = cfg.model, cfg.data, cfg.train, cfg.optim

  _positive(cfg, 'model', 'vocab_size', 'd_model', 'n_layers', 'n_heads', 'n_kv_heads', 'd_ff', 'max_seq_len',
            'rope_theta', 'norm_eps', 'init_std')
  _one_of('model.attention_impl', m.attention_impl, ATTENTION_IMPLS)
  _one_of('model.remat_policy', m.remat_policy, REMAT_POLICIES)
  _one_of('model.param_dtype', m.param_dtype, DTYPES)
  _one_of('model.dtype', m.dtype, DTYPES)
  if m.attention_impl == 'cudnn':
    if backend != 'gpu':
      _fail('model.attention_impl', f"'cudnn' needs a GPU but the backend is {backend!r}; use 'auto' or 'xla'")
    if not cudnn_supports(m.dtype, head_dim(m)):
      _fail('model.attention_impl', f"cuDNN's fused attention needs model.dtype bfloat16/float16 and a head dim "
            f"that is a multiple of 8 and <= 128 (got {m.dtype}, {head_dim(m)}); use 'auto' or 'xla'")
  if m.n_heads % m.n_kv_heads:
    _fail('model.n_kv_heads', f'{m.n_kv_heads} must divide model.n_heads={m.n_heads}')
  if m.head_dim < 0 or (m.head_dim == 0 and m.d_model % m.n_heads):
    _fail('model.head_dim', f'd_model={m.d_model} is not divisible by n_heads={m.n_heads}; set head_dim')
  if head_dim(m) % 2:
    _fail('model.head_dim', f'{head_dim(m)} is odd; rotary embeddings need an even head dim (set model.head_dim '
          'or change d_model / n_heads)')
  from framework.tokenizer import ByteTokenizer  # pylint: disable=g-import-not-at-top
  if d.source != 'array' and m.vocab_size < ByteTokenizer.vocab_size:
    _fail('model.vocab_size', f'{m.vocab_size} is smaller than the byte tokenizer\'s {ByteTokenizer.vocab_size}')

  _check_rules(cfg.mesh.axis_rules)
  sizes = mesh_sizes(cfg.mesh, num_devices)
  for field, value, name in (('model.n_heads', m.n_heads, 'heads'), ('model.n_kv_heads', m.n_kv_heads, 'kv_heads'),
                             ('model.d_ff', m.d_ff, 'mlp'), ('model.vocab_size', m.vocab_size, 'vocab'),
                             ('model.d_model', m.d_model, 'embed'), ('data.seq_len', d.seq_len, 'seq')):
    count, axes = shard_count(cfg.mesh.axis_rules, sizes, name)
    if value % count:
      _fail(field, f'{value} is not divisible by the {count} shards of logical axis {name!r} (mesh axes {axes} '
            'via mesh.axis_rules); change the size, the mesh sizes or the rule')

  if d.seq_len > m.max_seq_len:
    _fail('data.seq_len', f'{d.seq_len} is longer than the model allows (model.max_seq_len={m.max_seq_len}); '
          'shorten data.seq_len or raise model.max_seq_len')
  from framework import data as data_lib  # pylint: disable=g-import-not-at-top
  data_lib.validate_data_config(d)

  _positive(cfg, 'train', 'steps', 'batch_size', 'micro_batches', 'log_every', 'eval_batches')
  if t.eval_every < 0 or t.z_loss < 0:
    _fail('train.eval_every' if t.eval_every < 0 else 'train.z_loss', 'must be >= 0')
  dp, dp_axes = shard_count(cfg.mesh.axis_rules, sizes, 'batch')
  unit = dp * t.micro_batches
  if t.batch_size % unit:
    _fail('train.batch_size', f'{t.batch_size} is not divisible by the batch shards ({" x ".join(dp_axes) or "1"} '
          f'= {dp}) x train.micro_batches ({t.micro_batches}) = {unit}; use a multiple of {unit}')

  _one_of('optim.name', o.name, OPTIMIZERS)
  _one_of('optim.schedule', o.schedule, SCHEDULES)
  _positive(cfg, 'optim', 'lr')
  if o.warmup_steps < 0:
    _fail('optim.warmup_steps', f'must be >= 0, got {o.warmup_steps}')
  if not 0 < o.decay_fraction <= 1:
    _fail('optim.decay_fraction', f'{o.decay_fraction} must be in (0, 1]')
  if not 0 <= o.min_lr_ratio <= 1:
    _fail('optim.min_lr_ratio', f'{o.min_lr_ratio} must be in [0, 1]')
  for name in ('b1', 'b2', 'momentum'):
    if not 0 <= o[name] < 1:
      _fail(f'optim.{name}', f'{o[name]} must be in [0, 1)')
  if o.weight_decay < 0 or o.grad_clip < 0 or o.eps <= 0:
    _fail('optim.weight_decay' if o.weight_decay < 0 else 'optim.grad_clip' if o.grad_clip < 0 else 'optim.eps',
          'out of range: weight_decay and grad_clip must be >= 0, eps > 0')

  c = cfg.checkpoint
  _positive(cfg, 'checkpoint', 'every_steps', 'keep_last')
  if c.keep_every < 0:
    _fail('checkpoint.keep_every', f'must be >= 0, got {c.keep_every}')
  if cfg.metrics.peak_flops_per_device < 0:
    _fail('metrics.peak_flops_per_device', 'must be >= 0 (0: automatic)')
  return sizes
