"""The config: every section's defaults composed into one schema, and `validate`, run once before any compile.

Each feature owns its section: its defaults and its checks live beside its code, and this module only composes
them (a new feature adds one line to SECTIONS). Config files start from `defaults()` and change fields; a key
that is not in the schema is an error, so a typo never silently trains with a default.
"""
from __future__ import annotations

import ml_collections

from framework import batch_schedule, checkpoint, corpus, mesh, metrics, noise_scale, optim, scaling, train
from framework.config_checks import Context, fail
from framework.models import config as model_config
from framework.inference import config as inference_config
from framework.inference import serving_config
from framework.models import armt_config, moe_config

# Section name -> the module holding its `defaults()` and `validate(cfg, ctx)`. The mesh section is first: the
# others' checks depend on the mesh sizes it resolves.
SECTIONS = (
    ('mesh', mesh),
    ('model', model_config),
    ('data', corpus),
    ('train', train),
    ('moe', moe_config),
    ('armt', armt_config),
    ('optim', optim),
    ('scaling', scaling),
    ('noise_scale', noise_scale),
    ('batch_schedule', batch_schedule),
    ('checkpoint', checkpoint),
    ('metrics', metrics),
    ('inference', inference_config),
    ('serving', serving_config),
)
MAX_SEED = 2**31 - 1  # jax.random.key and the data order take 32-bit seeds


def defaults() -> ml_collections.ConfigDict:
  """Every config field with its default value. Config files override these."""
  cfg = ml_collections.ConfigDict()
  cfg.seed = 0
  for name, section in SECTIONS:
    cfg[name] = section.defaults()
  return cfg


def _check_keys(cfg, schema, prefix: str = '') -> None:
  for key in cfg.keys():
    field = f'{prefix}{key}'
    if key not in schema:
      known = ', '.join(sorted(schema.keys()))
      fail(field, f'unknown config key; known keys here: {known}')
    value, default = cfg[key], schema[key]
    if isinstance(default, ml_collections.ConfigDict):
      if not isinstance(value, ml_collections.ConfigDict):
        fail(field, f'must be a section, got {type(value).__name__}')
      _check_keys(value, default, field + '.')
    elif isinstance(default, bool):
      if not isinstance(value, bool):
        fail(field, f'must be True or False, got {value!r}')
    elif isinstance(default, int):
      if isinstance(value, bool) or not isinstance(value, int):
        fail(field, f'must be an integer, got {value!r}')
    elif isinstance(default, float):
      if isinstance(value, bool) or not isinstance(value, (int, float)):
        fail(field, f'must be a number, got {value!r}')
    elif isinstance(default, str) and not isinstance(value, str):
      fail(field, f'must be a string, got {value!r}')
  for key in schema.keys():
    if key not in cfg:
      fail(f'{prefix}{key}', 'missing; start config files from framework.config.defaults()')


def validate(cfg, *, num_devices: int, backend: str = 'cpu') -> dict[str, int]:
  """Checks every field once, before any compile. Returns the resolved mesh sizes.

  Raises ValueError naming the field and the fix.
  """
  _check_keys(cfg, defaults())
  if not 0 <= cfg.seed <= MAX_SEED:
    fail('seed', f'{cfg.seed} is out of range; use an integer in [0, {MAX_SEED}]')
  sizes = mesh.validate(cfg, num_devices)
  ctx = Context(num_devices=num_devices, backend=backend, sizes=sizes, rules=tuple(cfg.mesh.axis_rules))
  for name, section in SECTIONS:
    if name != 'mesh':
      section.validate(cfg, ctx)
  return sizes
