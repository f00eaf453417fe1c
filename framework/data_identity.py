"""What a run's data stream is, recorded with every checkpoint, so a resume onto different data is refused.

The data position in a checkpoint (`next_step`) only means something for the stream it counted: resuming with
another file set, seq_len, held-out fraction, seed or Python version (for the embedded corpus) would silently
train on a different sequence of examples. `describe` records every input that decides the stream plus the
packed streams' fingerprints; `differences` names what changed.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform

import jax
import numpy as np

from framework import corpus
from framework.corpus import PackedStream
from framework.tokenizer import ByteTokenizer


def _files(cfg_data) -> list[tuple[str, int]]:
  """(name, size) of every file the source reads, names relative to the glob root (or the stdlib)."""
  if cfg_data.source == 'embedded':
    return [(rel, os.path.getsize(full)) for rel, full in corpus.embedded_files()]
  root = corpus.glob_root(cfg_data.path)
  return [(os.path.relpath(p, root), os.path.getsize(p)) for p in corpus.match_files(cfg_data.path)]


def describe(cfg, train: PackedStream, heldout: PackedStream) -> dict:
  """The fields (named as the config names them) that decide which example a step sees."""
  d = cfg.data
  files = _files(d)
  record = {
      'data.source': d.source,
      'data.path': d.path,
      'data.seq_len': d.seq_len,
      'data.heldout_fraction': d.heldout_fraction,
      'seed': cfg.seed,
      'data.path (matched files)': f'{len(files)} files, digest '
                                   + hashlib.blake2b(json.dumps(files).encode(), digest_size=8).hexdigest(),
      'tokenizer': 'token ids read from the array' if d.source == 'array' else
                   f'byte-level, {ByteTokenizer.vocab_size} ids',
      'packed stream fingerprint (train, heldout)': f'{train.fingerprint()}, {heldout.fingerprint()}',
      'example order': corpus.ORDER_VERSION,
  }
  if d.source == 'array':
    record['data.bos_id'] = d.bos_id
  else:
    record['data.max_corpus_bytes'] = d.max_corpus_bytes
  if d.source == 'jsonl':
    record['data.jsonl_field'] = d.jsonl_field
  if d.source == 'embedded':
    record['python version (embedded corpus)'] = platform.python_version()
  return record


def differences(saved: dict | None, current: dict) -> list[str]:
  """'field: checkpoint X vs now Y' for each field that differs (all of them for a checkpoint without a record)."""
  if not saved:
    return ['the checkpoint records no data stream (written by an older batchax)']
  return [f'{k}: checkpoint {saved.get(k, "(not recorded)")!r} vs now {current.get(k, "(not recorded)")!r}'
          for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]


def check_processes_agree(record: dict) -> None:
  """Every process of a job must read the same stream (e.g. the same Python for the embedded corpus, the same
  files on every host's mount). Each field's digest is gathered from every process, so all of them stop
  together, naming the fields, instead of some training on while the others fail."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  keys = sorted(record)
  mine = np.array([int.from_bytes(hashlib.blake2b(repr(record[k]).encode(), digest_size=4).digest(), 'little')
                   for k in keys], np.uint32)
  every = np.asarray(multihost_utils.process_allgather(mine))  # [processes, fields]
  differ = sorted({keys[f] for f in np.flatnonzero((every != every[:1]).any(axis=0))})
  if differ:
    processes = [int(p) for p in np.flatnonzero((every != every[:1]).any(axis=1))]
    raise ValueError(f'data: processes {processes} read a different data stream than process 0 '
                     f'({", ".join(differ)} differ); give every process the same data settings, the same files '
                     'at data.path and the same Python version')
