"""Orbax checkpoints under WORKDIR/checkpoints/<step>/: train state, data position and the config.

Saves are asynchronous; keep-last-N plus keep-every-K. Restores go onto the *current* mesh (elastic): Orbax is
given abstract targets carrying the new shardings, so a checkpoint written on 8 devices loads onto 4 or 1.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

ITEMS = ('state', 'data', 'config')
# Orbax writes this file last, when a step's directory is complete.
_COMMIT_FILE = '_CHECKPOINT_METADATA'


class Checkpointer:
  """One run's checkpoint directory."""

  def __init__(self, directory: str, ckpt_cfg):
    self.directory = os.path.abspath(directory)
    self._quarantine_incomplete()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=ckpt_cfg.keep_last,
        keep_period=ckpt_cfg.keep_every or None,
        enable_async_checkpointing=ckpt_cfg.async_save,
        create=True,
        cleanup_tmp_directories=True,
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

  # A directory named like a step but without Orbax's commit file was cut off mid-write (or damaged later).
  # Moving it aside keeps it for inspection and stops Orbax from listing or overwriting it.
  def _quarantine_incomplete(self) -> None:
    if not os.path.isdir(self.directory) or jax.process_index() != 0:
      return
    for name in sorted(os.listdir(self.directory)):
      path = os.path.join(self.directory, name)
      if name.isdigit() and os.path.isdir(path) and not self._is_complete(path):
        target = os.path.join(self.directory, f'incomplete-{name}-{int(time.time())}')
        logging.warning('Checkpoint %s is incomplete (no %s or a missing item); skipping it and moving it to %s',
                        path, _COMMIT_FILE, target)
        os.rename(path, target)

  @staticmethod
  def _is_complete(path: str) -> bool:
    return (os.path.exists(os.path.join(path, _COMMIT_FILE))
            and all(os.path.isdir(os.path.join(path, item)) for item in ITEMS)
            and os.path.exists(os.path.join(path, 'state', '_METADATA')))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, data_state: dict, config_json: dict, *, force: bool = False) -> bool:
    """Starts an asynchronous save of `state` (after `step` updates). Returns whether a save started."""
    return self.manager.save(step, force=force, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(config_json),
    ))

  def restore(self, step: int, abstract_state) -> tuple[Any, dict]:
    """Loads step `step` onto the shardings carried by `abstract_state` (jax.ShapeDtypeStruct leaves)."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=ocp.args.JsonRestore(),
    ))
    return restored['state'], dict(restored['data'])

  def saved_config(self, step: int) -> dict:
    restored = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return dict(restored['config'])

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def config_to_json(cfg) -> dict:
  """The config as plain JSON (tuples become lists)."""
  return json.loads(cfg.to_json())
