"""Checks before a run starts or resumes, so a mistake fails in one line before anything compiles or is written:
a --workdir that cannot hold checkpoints, and a checkpoint whose state would not fit the config or whose data
position counts in another data stream."""
from __future__ import annotations

import os
import tempfile

import jax
import ml_collections
from absl import logging

from framework import config as config_lib
from framework import data_identity
from framework import optim
from framework import storage
from framework.models import config as model_config
from framework.models import armt_config, moe_config


def _missing_fields(saved: dict, schema, prefix: str = '') -> list[str]:
  missing = []
  for key in schema.keys():
    if key not in saved:
      missing.append(f'{prefix}{key}')
    elif isinstance(schema[key], ml_collections.ConfigDict) and isinstance(saved[key], dict):
      missing += _missing_fields(saved[key], schema[key], f'{prefix}{key}.')
  return missing


def _structure(cfg) -> dict:
  """The fields that fix the saved state's shapes and tree; anything else (compute dtype, remat, attention
  kernel, learning rate, ...) may change between a save and a resume."""
  return {**model_config.structure(cfg.model), **moe_config.structure(cfg), **armt_config.structure(cfg),
          **optim.structure(cfg.optim)}


def check_resume(checkpointer, step: int, cfg, data_record: dict, allow_data_change: bool = False) -> None:
  """Refuses, with the fields named, a resume whose state would not fit the checkpoint or whose data stream is
  not the one the checkpoint's data position counts. Reads only the checkpoint's JSON items: nothing compiles."""
  where = f'The checkpoint at step {step} in {checkpointer.directory}'
  saved_json = checkpointer.saved_json(step, 'config')
  missing = _missing_fields(saved_json, config_lib.defaults())
  try:
    saved = _structure(ml_collections.ConfigDict(saved_json))
  except (AttributeError, KeyError):
    needed = [f for f in missing if f.split('.')[0] in ('model', 'optim')]
    raise ValueError(f'{where} saved a config that lacks fields this version needs to check the resume '
                     f'({", ".join(needed or missing)}); resume with the batchax version that wrote it, or start '
                     'a new --workdir') from None
  if missing:
    logging.warning('%s saved a config without %s (an older batchax); they take their current values',
                    where, ', '.join(missing))
  current = _structure(cfg)
  diff = [f'{k}: checkpoint {saved.get(k, "(n/a)")!r} vs config {current.get(k, "(n/a)")!r}'
          for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
  if diff:
    raise ValueError(f'{where} was written with a different model or optimizer ({"; ".join(diff)}); use a new '
                     '--workdir or the checkpoint\'s settings')
  data_diff = data_identity.differences(checkpointer.saved_json(step, 'data').get('stream'), data_record)
  if data_diff and not allow_data_change:
    raise ValueError(f'{where} counted its data position in a different data stream ({"; ".join(data_diff)}); '
                     'restore the data settings, use a new --workdir, or pass --allow_data_change to resume '
                     'on the new stream knowingly')
  if data_diff:
    logging.warning('RESUMING ON A DIFFERENT DATA STREAM (--allow_data_change): %s. Step %d of the new stream '
                    'is not the example the checkpoint would have seen next.', '; '.join(data_diff), step)


def check_workdir(workdir: str) -> None:
  """A workdir that cannot hold checkpoints fails now, in one line, not at the first save. A remote one
  (gs://, ...) is checked by writing and deleting an object in it."""
  if storage.is_remote(workdir):
    try:
      root = storage.workdir_path(workdir)
    except ValueError as e:
      raise ValueError(f'--workdir {e}') from None
    storage.check_writable(root, jax.process_index())
    return
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f'--workdir {workdir!r} is a file, not a directory; pass a directory (it is created if '
                     'missing)')
  existing = os.path.abspath(workdir)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise ValueError(f'--workdir {workdir!r}: {existing} is a file, so the directory cannot be created; choose '
                     'another path')
  try:  # permission bits do not tell (root, read-only mounts): try a real write
    with tempfile.TemporaryFile(dir=existing):
      pass
  except OSError as e:
    raise ValueError(f'--workdir {workdir!r}: cannot write in {existing} ({e.strerror}); choose a writable '
                     'directory or fix its permissions') from None
