"""Parameters for the engine: from a batchax training run's checkpoint (whatever mesh saved it), placed on the
serving mesh; the Llama-format directory reader and writer live in framework/inference/hf_format.py.

    params = params_from_workdir(cfg, '/tmp/run', serving_sharder(cfg))   # the latest complete step
    engine = engine_from_workdir(cfg, '/tmp/run')
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from framework import checkpoint as ckpt_lib
from framework import storage
from framework.mesh import Sharder
from framework.models.armt_config import ARMTConfig
from framework.models.layers import ModelConfig
from framework.models.moe_config import MoEConfig

# Model fields that change what the parameters mean; the rest (context length, compute dtype, remat, attention
# implementation, scan unrolling) may differ between training and serving.
_MODEL_FIELDS = ('vocab_size', 'd_model', 'n_layers', 'n_heads', 'n_kv_heads', 'head_dim', 'd_ff', 'rope_theta',
                 'norm_eps', 'tie_embeddings', 'param_dtype')
_MOE_FIELDS = ('num_experts', 'top_k', 'd_ff_expert', 'every', 'shared_experts', 'router', 'normalize_top_k')
_ARMT_FIELDS = ('segment_len', 'memory_tokens', 'd_mem', 'memory')


def model_config(cfg) -> ModelConfig:
  """The served model: the dense or MoE decoder, or the recurrent-memory model when armt.segment_len > 0."""
  return ModelConfig.from_config(cfg.model, MoEConfig.from_config(cfg, 1), ARMTConfig.from_config(cfg))


def abstract_params(cfg, sharder: Sharder):
  """The parameters' shapes and dtypes (jax.ShapeDtypeStruct leaves) with their shardings on `sharder`'s mesh,
  from their logical axis names as training derives them."""
  from framework.models.armt import ARMT  # pylint: disable=g-import-not-at-top
  from framework.models.transformer import Transformer  # pylint: disable=g-import-not-at-top
  model_cfg = model_config(cfg)
  model = (Transformer if model_cfg.armt is None else ARMT)(model_cfg, Sharder(None, sharder.rules))
  dummy = jnp.zeros((1, 8), jnp.int32)
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), dummy, dummy, dummy))['params']
  shardings = sharder.tree_shardings(nn.get_partition_spec(boxed))
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(boxed), shardings)


def check_saved_model(cfg, saved: dict) -> None:
  """Raises ValueError naming the first model, moe or armt field where `cfg` and the run's saved config
  disagree."""
  for section, fields in (('model', _MODEL_FIELDS), ('moe', _MOE_FIELDS), ('armt', _ARMT_FIELDS)):
    theirs = saved.get(section, {})
    for field in fields:
      if field not in theirs:
        continue
      mine = cfg[section][field]
      if section == 'moe' and not cfg.moe.num_experts and not theirs.get('num_experts'):
        continue
      if section == 'armt' and not cfg.armt.segment_len and not theirs.get('segment_len'):
        continue
      if mine != theirs[field]:
        raise ValueError(f'{section}.{field}: the checkpoint was trained with {theirs[field]!r} but the config '
                         f'says {mine!r}; pass the config the run trained with (or --config.{section}.{field}='
                         f'{theirs[field]!r})')


def params_from_workdir(cfg, workdir: str, sharder: Sharder, step: int | None = None, flag: str = 'workdir'):
  """The parameters of step `step` (default: the latest complete one) of the run in `workdir`, restored
  straight onto `sharder`'s shardings (optimizer state is not read). `flag`: the launcher flag errors name."""
  directory = storage.workdir_path(workdir) / 'checkpoints'
  if not directory.is_dir():
    raise ValueError(f'--{flag}: {workdir} holds no checkpoints/ directory; train there first '
                     '(python -m launch.train --workdir=...) or pass --model_dir for a Llama-format directory')
  checkpointer = ckpt_lib.Checkpointer(directory, cfg.checkpoint)
  try:
    steps = checkpointer.all_steps()
    if not steps:
      raise ValueError(f'--{flag}: {directory} holds no complete checkpoint')
    if step is None:
      step = max(steps)
    elif step not in steps:
      raise ValueError(f'--step: {step} is not among the checkpoints in {directory} ({sorted(steps)})')
    check_saved_model(cfg, checkpointer.saved_json(step, 'config'))
    abstract = abstract_params(cfg, sharder)
    restored = checkpointer.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item={'params': abstract}, restore_args=ocp.checkpoint_utils.construct_restore_args({'params': abstract}),
        partial_restore=True)))
    return restored['state']['params']
  finally:
    checkpointer.close()


def engine_from_workdir(cfg, workdir: str, devices=None, step: int | None = None, codec=None, draft=None):
  """`draft`: (draft config, its workdir) for speculative decoding."""
  from framework.inference.engine import Engine, serving_sharder  # pylint: disable=g-import-not-at-top
  sharder = serving_sharder(cfg, devices)
  return Engine(cfg, params_from_workdir(cfg, workdir, sharder, step), codec=codec, sharder=sharder,
                draft=draft_from_workdir(draft, sharder))


def draft_from_workdir(draft, sharder: Sharder):
  """(draft config, params placed on `sharder`'s mesh) from (draft config, workdir); None passes through."""
  if draft is None:
    return None
  draft_cfg, workdir = draft
  return draft_cfg, params_from_workdir(draft_cfg, workdir, sharder, flag='draft_workdir')
