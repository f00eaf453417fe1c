"""Deterministic, checkpointable, per-process-sharded input pipeline.

The batch for step k is a pure function of (seed, k, process_index,
process_count) and the split's token stream: a resumed run passes the step
from its checkpoint and sees exactly the examples an uninterrupted run would,
and a run resharded over a different number of processes sees the same global
batch, split differently.

How examples are drawn: the split's packed stream is cut into non-overlapping
windows of seq_len + 1 tokens. Global example g = step * global_batch + row is
window perm_e[g % n_windows] of epoch e = g // n_windows, where perm_e is
`permutation.keyed_permutation(seed, e, n_windows)`: a keyed Feistel network
defined in this project (not NumPy's shuffle, whose stream may change between
releases), so a seed's example order survives library upgrades. Only the
batch's own entries of perm_e are computed, so any corpus size costs the same
per step. Every window is used once per epoch.

Typical use:

  train, heldout = load_splits(cfg.data)
  with DataIterator(train, seed=cfg.seed, global_batch=B,
                    seq_len=cfg.data.seq_len, start_step=restored_step,
                    process_index=jax.process_index(),
                    process_count=jax.process_count(),
                    prefetch=cfg.data.prefetch) as it:
    for batch in it: ...
    # checkpoint it.state() next to the model
"""
import queue
import threading
from typing import Any, Iterator

import numpy as np

from framework.corpus import (SOURCES, PackedStream, build_splits,
                              validate_data_config)

__all__ = ["SOURCES", "PackedStream", "DataIterator", "batch_at",
           "batch_for_step",
           "check_vocab", "eval_batches", "load_splits",
           "validate_data_config"]

Batch = dict[str, np.ndarray]


def _require_int(name: str, value: Any, minimum: int) -> None:
  ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
  if not ok or value < minimum:
    raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}.")


def _check_batch_args(stream: PackedStream, step: int, seed: int,
                      global_batch: int, seq_len: int, process_index: int,
                      process_count: int) -> None:
  _require_int("step", step, 0)
  _require_int("seed", seed, 0)
  _require_int("global_batch", global_batch, 1)
  _require_int("seq_len", seq_len, 1)
  _require_int("process_count", process_count, 1)
  _require_int("process_index", process_index, 0)
  if process_index >= process_count:
    raise ValueError(f"process_index={process_index} must be < "
                     f"process_count={process_count}.")
  if global_batch % process_count:
    raise ValueError(f"global_batch={global_batch} is not divisible by "
                     f"process_count={process_count}; choose a global batch "
                     "that is a multiple of the number of processes.")
  if stream.num_windows(seq_len) == 0:
    raise ValueError(_too_small(stream, seq_len))


def _too_small(stream: PackedStream, seq_len: int) -> str:
  return (f"data: the {stream.name} split has {len(stream)} tokens, fewer "
          f"than data.seq_len + 1 = {seq_len + 1} needed for one example; "
          "add data (data.path, data.max_corpus_bytes), lower data.seq_len, "
          "or change data.heldout_fraction.")


def _window_starts(stream: PackedStream, examples: np.ndarray, seed: int,
                   seq_len: int) -> np.ndarray:
  """Stream offsets of the windows for global example indices `examples`."""
  n = stream.num_windows(seq_len)
  epochs, slots = np.divmod(examples, n)
  windows = np.empty_like(examples)
  # A batch spans few epochs (usually one), so this loop is short.
  for epoch in np.unique(epochs):
    mask = epochs == epoch
    windows[mask] = stream.permutation(seed, int(epoch), n, slots[mask])
  return windows * (seq_len + 1)


def _features(window: np.ndarray, doc: np.ndarray,
              doc_domains: np.ndarray | None = None) -> Batch:
  """Packing features from a window's tokens and each token's document."""
  rows, width = window.shape
  seq_len = width - 1
  doc_in = doc[:, :-1]
  col = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (rows, seq_len))
  starts = np.ones((rows, seq_len), bool)
  starts[:, 1:] = doc_in[:, 1:] != doc_in[:, :-1]
  # Column where each token's document starts within the row.
  start_col = np.maximum.accumulate(np.where(starts, col, 0), axis=1)
  features = {
      "inputs": window[:, :-1].astype(np.int32),
      "targets": window[:, 1:].astype(np.int32),
      "segment_ids": (doc_in - doc_in[:, :1] + 1).astype(np.int32),
      "positions": (col - start_col).astype(np.int32),
      "weights": (doc[:, 1:] == doc_in).astype(np.float32),
  }
  if doc_domains is not None:
    features["domains"] = doc_domains[doc_in].astype(np.int32)
  return features


def batch_for_step(stream: PackedStream, step: int, *, seed: int,
                   global_batch: int, seq_len: int, process_index: int = 0,
                   process_count: int = 1) -> Batch:
  """This process's slice of the global batch for `step`: a pure function.

  Args:
    stream: the split's packed token stream.
    step: training step (>= 0).
    seed: data seed (>= 0); it alone decides the example order.
    global_batch: examples per step over all processes.
    seq_len: tokens per example.
    process_index: this process; it gets rows
      [process_index * B/P, (process_index + 1) * B/P) of the global batch.
    process_count: number of processes P; must divide global_batch.

  Returns:
    int32 arrays of shape [global_batch / process_count, seq_len]:
      inputs, targets: window[:-1] and window[1:].
      segment_ids: 1-based document number within the row; the (possibly
        partial) document at the row start is 1, each document start adds 1.
      positions: position within the document, 0 at each document start.
        The partial document at the row start also starts at 0 (its true
        offset is not used), so positions are always < seq_len.
      weights (float32): 1 where the target is in the input token's
        document, 0 where it is the next document's first token.
      domains (only for a stream with domain labels, e.g. the 'domains'
        source): each input token's document's domain.

  Raises:
    ValueError: on bad arguments or a stream with fewer than seq_len + 1
      tokens.
  """
  _check_batch_args(stream, step, seed, global_batch, seq_len, process_index,
                    process_count)
  return batch_at(stream, step * global_batch, seed=seed,
                  global_batch=global_batch, seq_len=seq_len,
                  process_index=process_index, process_count=process_count)


def batch_at(stream: PackedStream, first_example: int, *, seed: int,
             global_batch: int, seq_len: int, process_index: int = 0,
             process_count: int = 1) -> Batch:
  """The batch of global examples first_example ... + global_batch - 1.

  The same as batch_for_step(step) when first_example = step * global_batch;
  counting examples rather than steps lets the batch size change (between
  runs, or during one) without skipping or repeating an example.
  """
  _require_int("first_example", first_example, 0)
  _check_batch_args(stream, 0, seed, global_batch, seq_len, process_index,
                    process_count)
  local = global_batch // process_count
  first = first_example + process_index * local
  examples = first + np.arange(local, dtype=np.int64)
  starts = _window_starts(stream, examples, seed, seq_len)
  positions = starts[:, None] + np.arange(seq_len + 1, dtype=np.int64)
  doc = np.searchsorted(stream.doc_starts, positions, side="right") - 1
  return _features(stream.take(positions), doc, stream.doc_domains)


def eval_batches(stream: PackedStream, n: int, *, seed: int,
                 global_batch: int, seq_len: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[Batch]:
  """The same `n` held-out batches on every call (steps 0..n-1 of `seed`).

  If n * global_batch exceeds the split's windows, later batches repeat
  windows in a new order; keep n * global_batch <= stream.num_windows(seq_len)
  for an evaluation that sees each window at most once.
  """
  _require_int("n", n, 0)
  for step in range(n):
    yield batch_for_step(stream, step, seed=seed, global_batch=global_batch,
                         seq_len=seq_len, process_index=process_index,
                         process_count=process_count)


def load_splits(cfg_data: Any) -> tuple[PackedStream, PackedStream]:
  """Validates `cfg_data`, builds the source, checks both splits are usable.

  Returns:
    (train_stream, heldout_stream).

  Raises:
    ValueError: a bad config field (named `data.<field>`), or a split with
      fewer than seq_len + 1 tokens.
  """
  train, heldout = build_splits(cfg_data)
  for stream in (train, heldout):
    if stream.num_windows(int(cfg_data.seq_len)) == 0:
      raise ValueError(_too_small(stream, int(cfg_data.seq_len)))
  return train, heldout


def check_vocab(stream: PackedStream, vocab_size: int) -> None:
  """Refuses a model whose vocabulary cannot hold every id of `stream`.

  Worth a check because an out-of-range id raises nothing on device: the embedding lookup returns a fill value
  (NaN) or a clamped row, and training silently goes wrong.

  Raises:
    ValueError: naming `model.vocab_size` (too small) or `data.path`
      (negative ids).
  """
  lo, hi = stream.token_range()
  if lo < 0:
    raise ValueError(f"data.path: the token ids include {lo}; ids must be "
                     ">= 0, re-tokenize the data.")
  needed = stream.vocab_size or hi + 1
  if vocab_size < needed:
    raise ValueError(f"model.vocab_size: {vocab_size} is too small for the "
                     f"data, which needs {needed} ids (largest id {hi}); set "
                     f"model.vocab_size >= {needed}.")


class _Failure:
  """Carries an exception from the prefetch thread to the consumer."""

  def __init__(self, exc: BaseException):
    self.exc = exc


class DataIterator:
  """Batches for steps start_step, start_step + 1, ... with optional prefetch.

  Each batch equals `batch_for_step(stream, step, ...)` (with start_example
  given: `batch_at` the example offset, which advances by global_batch per
  batch whatever batch size came before); a daemon thread
  builds up to `prefetch` of them ahead. An exception raised while building
  a batch is re-raised from `__next__`. `state()` counts batches handed to the
  consumer, not built, so prefetched batches are never skipped on resume.
  """

  def __init__(self, stream: PackedStream, *, seed: int, global_batch: int,
               seq_len: int, start_step: int = 0, process_index: int = 0,
               process_count: int = 1, prefetch: int = 2,
               start_example: int | None = None):
    _check_batch_args(stream, start_step, seed, global_batch, seq_len,
                      process_index, process_count)
    _require_int("prefetch", prefetch, 0)
    if start_example is None:
      start_example = start_step * global_batch
    _require_int("start_example", start_example, 0)
    self._global_batch = global_batch
    self._next_example = start_example
    self._stream = stream
    self._seed = seed
    self._kwargs = dict(seed=seed, global_batch=global_batch, seq_len=seq_len,
                        process_index=process_index,
                        process_count=process_count)
    self._next_step = start_step
    self._failure: BaseException | None = None
    self._closed = False
    self._stop = threading.Event()
    self._queue: queue.Queue = queue.Queue(maxsize=max(prefetch, 1))
    self._thread = None
    if prefetch > 0:
      self._thread = threading.Thread(target=self._work,
                                      args=(start_step, start_example),
                                      name="batchax-data", daemon=True)
      self._thread.start()

  def __iter__(self) -> "DataIterator":
    return self

  def __next__(self) -> Batch:
    if self._closed:
      raise RuntimeError("DataIterator is closed.")
    if self._failure is not None:
      raise self._failure
    if self._thread is None:
      batch = batch_at(self._stream, self._next_example, **self._kwargs)
    else:
      batch = self._take()
    self._next_step += 1
    self._next_example += self._global_batch
    return batch

  def state(self) -> dict[str, int]:
    """JSON-able position to checkpoint; resume with start_step=next_step,
    start_example=next_example (the example offset is what keeps the data
    exact if the batch size differs on resume)."""
    return {"next_step": self._next_step, "next_example": self._next_example,
            "seed": self._seed}

  def close(self) -> None:
    """Stops the prefetch thread; safe to call more than once."""
    self._closed = True
    self._stop.set()
    if self._thread is not None:
      self._drain()
      self._thread.join(timeout=10.0)

  def __enter__(self) -> "DataIterator":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def _work(self, step: int, example: int) -> None:
    try:
      while not self._stop.is_set():
        batch = batch_at(self._stream, example, **self._kwargs)
        if not self._put((step, batch)):
          return
        step += 1
        example += self._global_batch
    except BaseException as e:  # Any failure must reach the consumer.
      e.add_note(f"(raised in the data prefetch thread building step {step})")
      self._put(_Failure(e))

  def _put(self, item: Any) -> bool:
    """Blocks until queued or stopped; polls so close() never hangs."""
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _take(self) -> Batch:
    while True:
      try:
        item = self._queue.get(timeout=1.0)
        break
      except queue.Empty:
        if not self._thread.is_alive() and self._queue.empty():
          raise RuntimeError("the data prefetch thread died without a "
                             "batch or an error.") from None
    if isinstance(item, _Failure):
      self._failure = item.exc
      raise item.exc
    step, batch = item
    assert step == self._next_step, (step, self._next_step)
    return batch

  def _drain(self) -> None:
    while True:
      try:
        self._queue.get_nowait()
      except queue.Empty:
        return
