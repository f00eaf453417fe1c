"""Orbax checkpoints under WORKDIR/checkpoints/<step>/: train state, data position and the config. WORKDIR may be
remote (gs://, ...: framework/storage.py); Orbax then commits by marker file instead of rename (see below).

Saves are asynchronous; keep-last-N plus keep-every-K. Restores go onto the *current* mesh (elastic): Orbax is
given abstract targets carrying the new shardings, so a checkpoint written on 8 devices loads onto 4 or 1.
A step counts only once Orbax has committed it (`incomplete_reason`); step directories that fail are moved aside.
"""
from __future__ import annotations

import json
import time
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from framework import storage
from framework.config_checks import Context, non_negative, positive

ITEMS = ('state', 'data', 'config')


class CommitError(OSError):
  """A save did not reach the disk (full disk, lost mount, ...): the run must not report success."""

# Per item, the file that is the item (JSON) or that indexes its arrays once they are written (_METADATA).
_ITEM_FILES = {'state': '_METADATA', 'data': 'metadata', 'config': 'metadata'}

# What Orbax 0.12 writes for step N, and when (orbax/checkpoint/_src/path/atomicity.py):
# - `_create_tmp_directory`: N.orbax-checkpoint-tmp/ and, first of all, _CHECKPOINT_METADATA (init timestamp).
#   So that file says nothing about completeness: it exists from the first moment of a save.
# - every item goes into N.../<item>.orbax-checkpoint-tmp/ and is finalized like the step, into <item>/ holding
#   its own commit_success.txt.
# - `AtomicRenameTemporaryPath.finalize` (default for any path but gs://): _CHECKPOINT_METADATA gets its commit
#   timestamp, commit_success.txt is written, then N.orbax-checkpoint-tmp is renamed to N.
# - `CommitFileTemporaryPath.finalize` (gs://, or AtomicityOptions(mode=COMMIT_FILE) where rename is not atomic):
#   N/ is written in place from the start, and commit_success.txt, written last, is the only sign of a commit.
_TMP_SUFFIX = ocp.path.step.TMP_DIR_SUFFIX            # older Orbax versions appended a -<timestamp or counter>
_COMMIT_SUCCESS = ocp.path.atomicity.COMMIT_SUCCESS_FILE


def incomplete_reason(path, siblings: list[str] | None = None) -> str | None:
  """Why the step directory `path` (local or remote) is not a complete checkpoint; None when it is.

  `siblings`: the names in its parent directory, when the caller has listed them already.
  """
  path = storage.workdir_path(path)
  name = path.name
  if not name.isdigit():  # includes N.orbax-checkpoint-tmp*: never renamed into place
    return 'not a finalized step name'
  # Orbax's own rule for this path's atomicity mode (`step.is_checkpoint_finalized` -> `validate_final`).
  if not ocp.path.step.is_checkpoint_finalized(path):
    return 'Orbax does not count it as finalized'
  # Under atomic rename Orbax trusts the name alone. We require the marker in every mode (Orbax writes it in
  # both finalize()s), so a step written in place is never taken for a renamed one: a bucket mounted with
  # gcsfuse looks local, gets atomic rename, and renames object by object. (Renamed steps without a marker, from
  # older Orbax, are what Orbax calls legacy: `AtomicityOptions.allow_legacy_atomic_rename`.)
  if not (path / _COMMIT_SUCCESS).exists():
    return f'no {_COMMIT_SUCCESS}'
  # Such a copy-then-delete rename cut off midway leaves its source behind, and the copied part may already
  # hold the marker.
  if siblings is None:
    siblings = [p.name for p in path.parent.iterdir()]
  if any(s.startswith(name + _TMP_SUFFIX) for s in siblings):
    return f'its {name}{_TMP_SUFFIX} source is still there (a rename that did not finish)'
  for item, filename in _ITEM_FILES.items():
    for required in (_COMMIT_SUCCESS, filename):
      if not (path / item / required).exists():
        return f'no {item}/{required}'
  return None


class Checkpointer:
  """One run's checkpoint directory."""

  def __init__(self, directory: str, ckpt_cfg):
    self.directory = storage.workdir_path(directory)
    self.quarantine = self.directory.with_name(self.directory.name + '-incomplete')  # checkpoints-incomplete/
    self._unverified_step = None
    if jax.process_index() == 0:
      self._quarantine_incomplete()
    # Every process lists the steps while the manager is built (`CheckpointManager._load_checkpoint_infos`), and
    # none may list before process 0 has moved partial ones aside. Orbax's own create=True barrier
    # (`_create_root_directory`) happens to order this today; this one does not depend on that option.
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'batchax checkpoint quarantine {self.directory}')
    options = ocp.CheckpointManagerOptions(
        max_to_keep=ckpt_cfg.keep_last,
        keep_period=ckpt_cfg.keep_every or None,
        enable_async_checkpointing=ckpt_cfg.async_save,
        create=True,
        # Removes the N.orbax-checkpoint-tmp* directories of saves that were cut off
        # (`temporary_paths.cleanup_temporary_paths`, process 0, in the background until the first save). They
        # are never listed meanwhile: Orbax's step regex and `validate_final` both reject the tmp suffix.
        cleanup_tmp_directories=True,
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

  # A step-named directory that fails `incomplete_reason` was cut off mid-write (or damaged later). Moving it
  # aside keeps it for inspection and stops Orbax from listing, restoring or overwriting it. Runs before the
  # manager exists, so before Orbax's tmp cleanup removes the evidence of an unfinished rename. The place aside
  # is outside the checkpoint directory: on gs:// Orbax's cleanup deletes every directory in it that lacks a
  # commit marker, whatever its name.
  def _quarantine_incomplete(self) -> None:
    if not self.directory.is_dir():
      return
    names = sorted(p.name for p in self.directory.iterdir())
    for name in names:
      path = self.directory / name
      if not (name.isdigit() and path.is_dir()):
        continue
      reason = incomplete_reason(path, names)
      if reason is None:
        continue
      target = self.quarantine / f'{name}-{int(time.time())}'
      while target.exists():
        target = target.with_name(target.name + '+')
      logging.warning('Checkpoint %s is incomplete (%s); skipping it and moving it to %s', path, reason, target)
      self.quarantine.mkdir(parents=True, exist_ok=True)
      storage.move_tree(path, target)  # in a bucket, copies and deletes: a cut-off move leaves a step that
      # is still incomplete, moved aside again by the next run

  def _require_complete(self, step: int) -> None:
    reason = incomplete_reason(self.directory / str(step))
    if reason is not None:
      raise ValueError(f'Checkpoint step {step} in {self.directory} is incomplete ({reason}); not restoring it')

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, data_state: dict, config_json: dict, *, force: bool = False) -> bool:
    """Starts an asynchronous save of `state` (after `step` updates). Returns whether a save started."""
    started = self.manager.save(step, force=force, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(config_json),
    ))
    if started:
      self._unverified_step = step  # save() has waited for the one before, but not checked its result
    return started

  def restore(self, step: int, abstract_state) -> tuple[Any, dict]:
    """Loads step `step` onto the shardings carried by `abstract_state` (jax.ShapeDtypeStruct leaves)."""
    self._require_complete(step)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=ocp.args.JsonRestore(),
    ))
    return restored['state'], dict(restored['data'])

  def saved_json(self, step: int, item: str) -> dict:
    """One of the JSON items ('data' or 'config') of step `step`, without touching the arrays."""
    self._require_complete(step)
    restored = self.manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))
    return dict(restored[item])

  def wait(self) -> None:
    """Returns once the last save is committed on disk; raises if it was not."""
    self.manager.wait_until_finished()
    # Orbax's finalize thread logs a failed commit and carries on (`CheckpointManager._finalize_checkpoint`), so
    # wait_until_finished() returning proves nothing: the disk does. Every process may look: the others wait at
    # Orbax's 'async_commit_complete' barrier until process 0 has renamed the step (async_checkpointer.py).
    step, self._unverified_step = self._unverified_step, None
    if step is not None:
      reason = incomplete_reason(self.directory / str(step))
      if reason is not None:
        raise CommitError(f'The checkpoint of step {step} in {self.directory} was not committed ({reason}); '
                           'see the Orbax errors logged above')

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self.manager.close()


def config_to_json(cfg) -> dict:
  """The config as plain JSON (tuples become lists)."""
  return json.loads(cfg.to_json())


# --- the `checkpoint` config section -----------------------------------------------------------------------------


def defaults() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      enabled=True,
      every_steps=100,
      keep_last=3,
      keep_every=0,          # also keep every K-th step forever; 0: off
      async_save=True,
  ))


def validate(cfg, ctx: Context) -> None:
  del ctx
  positive(cfg.checkpoint, 'checkpoint', 'every_steps', 'keep_last')
  non_negative(cfg.checkpoint, 'checkpoint', 'keep_every')
