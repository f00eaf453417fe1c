"""The flags that name a model to serve, shared by launch.generate and launch.serve: a batchax training run
(--config and --workdir, optionally --step) or a Llama-format directory (--model_dir, optionally --config for its
inference section and mesh); and optionally a draft model for speculative decoding (--draft_config and
--draft_workdir: a batchax run with the same vocabulary, served on the target's mesh)."""
from absl import flags
from ml_collections import config_flags

CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (get_config(arg) -> ConfigDict); with '
                                         '--model_dir, optional (its inference section and mesh apply).',
                                         lock_config=True)
WORKDIR = flags.DEFINE_string('workdir', None, 'A batchax training run: serve its latest complete checkpoint.')
STEP = flags.DEFINE_integer('step', None, 'Serve this checkpoint step of --workdir instead of the latest.')
MODEL_DIR = flags.DEFINE_string('model_dir', None, 'A Llama-format directory (config.json, *.safetensors, '
                                'tokenizer.json) as Hugging Face writes it.')

DRAFT_CONFIG = config_flags.DEFINE_config_file('draft_config', None, 'The draft model\'s config, for speculative '
                                               'decoding (inference.speculative_tokens per round).',
                                               lock_config=True)
DRAFT_WORKDIR = flags.DEFINE_string('draft_workdir', None, 'The draft model\'s training run (its latest checkpoint).')


def load_config():
  """The validated config of the model the flags name; raises ValueError naming the flag."""
  if bool(WORKDIR.value) == bool(MODEL_DIR.value):
    raise ValueError('give one of --workdir (a batchax run) or --model_dir (a Llama-format directory)')
  if WORKDIR.value and CONFIG.value is None:
    raise ValueError('--config: required with --workdir (the config the run trained with)')
  from framework import config as config_lib  # pylint: disable=g-import-not-at-top  (after the device flags)
  from framework.inference import hf_format  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  cfg = hf_format.serving_config(MODEL_DIR.value, CONFIG.value) if MODEL_DIR.value else CONFIG.value
  config_lib.validate(cfg, num_devices=jax.device_count(), backend=jax.default_backend())
  return cfg


def load_draft_config(cfg):
  """The draft's validated config, on the target's mesh (None without --draft_config); raises ValueError."""
  if (DRAFT_CONFIG.value is None) != (not DRAFT_WORKDIR.value):
    raise ValueError('--draft_config, --draft_workdir: give both (speculative decoding) or neither')
  if DRAFT_CONFIG.value is None:
    return None
  from framework.inference import speculative  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  try:
    return speculative.draft_config(cfg, DRAFT_CONFIG.value, jax.device_count(), jax.default_backend())
  except ValueError as e:
    raise ValueError(f'--draft_config: {e}') from None


def build_engine(cfg):
  """The engine over the named model's parameters (and the draft's), placed on the serving mesh."""
  from framework.inference import hf_format, loading  # pylint: disable=g-import-not-at-top
  draft_cfg = load_draft_config(cfg)
  draft = None if draft_cfg is None else (draft_cfg, DRAFT_WORKDIR.value)
  if MODEL_DIR.value:
    return hf_format.engine_from_model_dir(cfg, MODEL_DIR.value, draft=draft)
  return loading.engine_from_workdir(cfg, WORKDIR.value, step=STEP.value, draft=draft)


def model_name(cfg) -> str:
  """serving.model_name, else the directory's name."""
  import os  # pylint: disable=g-import-not-at-top
  if cfg.serving.model_name:
    return cfg.serving.model_name
  return os.path.basename(os.path.normpath(MODEL_DIR.value or WORKDIR.value)) or 'batchax'
