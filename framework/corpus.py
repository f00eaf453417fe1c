"""Token sources: documents in, one packed token stream per split out.

A source ('embedded' | 'text' | 'jsonl' | 'array') is read once into a
`PackedStream`: documents laid end to end as [BOS] tokens [EOS] (byte-level),
plus the offset where each document starts. Documents go to the held-out split
by a stable hash of their identity (relative path, line number, or document
index), never by position, so adding files leaves every earlier document in
the split it was in.

The 'embedded' corpus is the Python standard library's own .py sources, which
exist on every machine, so examples and tests never need a download. Its
content follows the Python version, so all processes of a job must run the
same Python (compare `PackedStream.fingerprint()` across hosts to be sure).
"""
import glob
import hashlib
import json
import logging
import os
import sysconfig
import time
from typing import Any, Iterator

import ml_collections
import numpy as np

from framework import domains as domains_lib
from framework.permutation import keyed_permutation, splitmix64
from framework.tokenizer import ByteTokenizer

SOURCES = ("embedded", "text", "jsonl", "array", "domains")
# Names the window-order algorithm (`keyed_permutation`); checkpoints record it, so a change to the order is a
# change of data stream that a resume refuses. Bump it whenever the order changes.
ORDER_VERSION = "keyed Feistel v1"
# Directories of the standard library that hold tests or third-party code
# rather than library source; they are skipped so the corpus is the same
# whether or not a distribution ships its test suite.
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests",
                        "idle_test", "__pycache__"})
_HASH_PERSON = b"batchax-split"
_BOS_SCAN_CHUNK = 1 << 26  # Bounds the temporary mask when scanning big .npy.

Document = tuple[str, bytes]  # (stable identity, raw bytes)


class PackedStream:
  """One split's tokens: its documents packed end to end.

  The stream is the concatenation of runs, slices of a base token array, so a
  split of a memory-mapped .npy needs no copy: run i covers stream positions
  [run_offsets[i], run_offsets[i + 1]) and starts at base index run_base[i].
  Sources read into memory have one run covering the whole base array.

  Attributes:
    name: split name, for messages.
    tokens: the 1-D base token array (may be a read-only memmap).
    doc_starts: int64 [num_documents], sorted stream offsets where each
      document begins; doc_starts[0] == 0.
  """

  def __init__(self, tokens: np.ndarray, doc_starts: np.ndarray, *,
               name: str = "stream", run_base: np.ndarray | None = None,
               run_lengths: np.ndarray | None = None):
    self.name = name
    self.tokens = tokens
    self.doc_starts = np.asarray(doc_starts, dtype=np.int64)
    if run_base is None:
      run_base = np.zeros(1, np.int64)
      run_lengths = np.array([tokens.shape[0]], np.int64)
    self._run_base = np.asarray(run_base, np.int64)
    self._run_offsets = np.concatenate(
        [[0], np.cumsum(run_lengths, dtype=np.int64)])
    self._contiguous = (self._run_base.size == 1 and self._run_base[0] == 0)
    self._token_range: tuple[int, int] | None = None
    # Byte-level sources set this; 'array' sources leave it to the data.
    self.vocab_size: int | None = None
    # int32 [num_documents]: each document's domain (the 'domains' source), else None.
    self.doc_domains: np.ndarray | None = None

  @classmethod
  def from_tokens(cls, tokens: np.ndarray, bos_id: int = ByteTokenizer.BOS_ID,
                  name: str = "stream") -> "PackedStream":
    """A stream whose documents start at each `bos_id` (and at offset 0)."""
    return cls(tokens, _document_starts(tokens, bos_id), name=name)

  def __len__(self) -> int:
    return int(self._run_offsets[-1])

  @property
  def num_documents(self) -> int:
    return int(self.doc_starts.size)

  def num_windows(self, seq_len: int) -> int:
    """Non-overlapping windows of seq_len + 1 tokens (the tail is dropped)."""
    return len(self) // (seq_len + 1)

  def take(self, positions: np.ndarray) -> np.ndarray:
    """Tokens at the given stream positions (any shape), in the base dtype."""
    if self._contiguous:
      return self.tokens[positions]
    run = np.searchsorted(self._run_offsets, positions, side="right") - 1
    return self.tokens[self._run_base[run] + positions - self._run_offsets[run]]

  def document(self, index: int) -> np.ndarray:
    """The tokens of document `index`."""
    stop = (self.doc_starts[index + 1] if index + 1 < self.num_documents
            else len(self))
    return self.take(np.arange(self.doc_starts[index], stop))

  def permutation(self, seed: int, epoch: int, n: int,
                  slots: np.ndarray | None = None) -> np.ndarray:
    """The window order of `epoch`, or just its entries at `slots`.

    See `keyed_permutation`; it depends on (seed, epoch, n) only, not on the
    stream's tokens.
    """
    return keyed_permutation(seed, epoch, n, slots)

  def token_range(self) -> tuple[int, int]:
    """(min, max) id in the base array, scanned in chunks once and cached."""
    if self._token_range is None:
      lo, hi = 0, -1
      for start in range(0, self.tokens.shape[0], _BOS_SCAN_CHUNK):
        chunk = np.asarray(self.tokens[start:start + _BOS_SCAN_CHUNK])
        lo = min(lo, int(chunk.min()))
        hi = max(hi, int(chunk.max()))
      self._token_range = (lo, hi)
    return self._token_range

  def fingerprint(self, max_samples: int = 1 << 20) -> str:
    """A short hash of the length, document starts and sampled tokens.

    Cheap even for a large memmap (a strided sample, not every token); store
    it with a checkpoint to notice that a resumed run reads different data.
    """
    h = hashlib.blake2b(digest_size=8)
    h.update(np.int64(len(self)).tobytes())
    h.update(self.doc_starts.tobytes())
    stride = max(1, len(self) // max_samples)
    h.update(self.take(np.arange(0, len(self), stride)).astype(np.int64)
             .tobytes())
    return h.hexdigest()


def _document_starts(tokens: np.ndarray, bos_id: int) -> np.ndarray:
  """Offsets of every `bos_id`, scanned in chunks to bound memory; 0 first."""
  parts = [np.zeros(0, np.int64)]
  for lo in range(0, tokens.shape[0], _BOS_SCAN_CHUNK):
    chunk = np.asarray(tokens[lo:lo + _BOS_SCAN_CHUNK])
    parts.append(np.flatnonzero(chunk == bos_id).astype(np.int64) + lo)
  starts = np.concatenate(parts)
  # Tokens before the first BOS still form a document of their own.
  if starts.size == 0 or starts[0] != 0:
    starts = np.concatenate([np.zeros(1, np.int64), starts])
  return starts


# --------------------------------------------------------------- validation


def defaults() -> ml_collections.ConfigDict:
  """The `data` config section."""
  return ml_collections.ConfigDict(dict(
      source="embedded",     # embedded | text | jsonl | array | domains (labelled, framework/domains.py)
      path="",               # glob (text, jsonl) or .npy file (array)
      jsonl_field="text",
      bos_id=1,              # document start marker in 'array' sources
      heldout_fraction=0.05,
      max_corpus_bytes=16_000_000,
      seq_len=256,
      prefetch=2,
  ))


def _bad(field: str, message: str) -> ValueError:
  return ValueError(f"data.{field}: {message}")


def _get(cfg: Any, field: str) -> Any:
  try:
    return getattr(cfg, field)
  except AttributeError:
    raise _bad(field, "missing from the data config; add it") from None


def _is_int(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def match_files(pattern: str) -> list[str]:
  """Files (not directories) matching `pattern`, sorted."""
  paths = glob.glob(os.path.expanduser(pattern), recursive=True)
  return sorted(p for p in paths if os.path.isfile(p))


def _check_scalars(cfg: Any) -> None:
  seq_len = _get(cfg, "seq_len")
  if not _is_int(seq_len) or seq_len < 2:
    raise _bad("seq_len", f"got {seq_len!r}; set it to an int >= 2 "
               "(tokens per example).")
  frac = _get(cfg, "heldout_fraction")
  if not isinstance(frac, (int, float)) or not 0.0 < frac <= 0.5:
    raise _bad("heldout_fraction", f"got {frac!r}; set it to a float in "
               "(0, 0.5], e.g. 0.05.")
  prefetch = _get(cfg, "prefetch")
  if not _is_int(prefetch) or prefetch < 0:
    raise _bad("prefetch", f"got {prefetch!r}; set it to an int >= 0 "
               "(0 builds batches synchronously).")
  cap = _get(cfg, "max_corpus_bytes")
  if not _is_int(cap) or cap <= 0:
    raise _bad("max_corpus_bytes", f"got {cap!r}; set it to a positive int, "
               "e.g. 16_000_000.")
  bos_id = _get(cfg, "bos_id")
  if not _is_int(bos_id) or bos_id < 0:
    raise _bad("bos_id", f"got {bos_id!r}; set it to the non-negative id "
               f"that starts each document (ByteTokenizer: "
               f"{ByteTokenizer.BOS_ID}).")
  field = _get(cfg, "jsonl_field")
  if not isinstance(field, str) or not field:
    raise _bad("jsonl_field", f"got {field!r}; set it to the name of the "
               "JSON field holding the text, e.g. 'text'.")


def _check_jsonl_first_record(path: str, field: str) -> None:
  with open(path, "rb") as f:
    for line_no, line in enumerate(f):
      if line.strip():
        break
    else:
      raise _bad("path", f"'{path}' holds no records; point data.path at "
                 "JSONL files with one JSON object per line.")
  try:
    record = json.loads(line)
  except ValueError as e:
    raise _bad("path", f"'{path}' line {line_no + 1} is not JSON ({e}); "
               "point data.path at JSONL files.") from None
  if not isinstance(record, dict) or field not in record:
    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise _bad("jsonl_field", f"{field!r} is not in the first record of "
               f"'{path}' (it has {keys}); set data.jsonl_field to the field "
               "that holds the text.")


def _check_array(path: str) -> None:
  try:
    array = np.load(path, mmap_mode="r", allow_pickle=False)
  except (OSError, ValueError) as e:
    raise _bad("path", f"cannot load '{path}' as a .npy array ({e}); save "
               "the token ids with np.save.") from None
  if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
    raise _bad("path", f"'{path}' has shape {array.shape} and dtype "
               f"{array.dtype}; it must be a 1-D integer array of token ids "
               "(save with np.save(path, ids.reshape(-1).astype(np.int32))).")
  if array.size == 0:
    raise _bad("path", f"'{path}' is empty; it must hold token ids.")


def _check_path(cfg: Any, source: str) -> None:
  path = _get(cfg, "path")
  if source in ("embedded", "domains"):
    if path:
      raise _bad("path", f"got {path!r} but data.source={source!r} reads "
                 "the Python standard library (and generates the rest); set "
                 "data.path='' or choose data.source='text'|'jsonl'|'array'.")
    return
  if not isinstance(path, str) or not path:
    raise _bad("path", f"got {path!r}; set it to a file or glob for "
               f"data.source={source!r}.")
  files = match_files(path)
  if not files:
    example = {"text": "'/data/books/**/*.txt'", "jsonl": "'/data/*.jsonl'",
               "array": "'/data/tokens.npy'"}[source]
    raise _bad("path", f"no file matches '{path}'; set data.path to an "
               f"existing file or glob, e.g. {example}.")
  if source == "jsonl":
    _check_jsonl_first_record(files[0], _get(cfg, "jsonl_field"))
  elif source == "array":
    if len(files) > 1:
      raise _bad("path", f"'{path}' matches {len(files)} files; "
                 "data.source='array' reads one .npy file, set data.path "
                 "to it.")
    _check_array(files[0])


def validate(cfg: Any, ctx: Any) -> None:
  """The `data` section's checks, as framework.config composes them."""
  del ctx
  validate_data_config(cfg.data)


def validate_data_config(cfg: Any) -> None:
  """Checks the data config cheaply, before anything is built or compiled.

  Args:
    cfg: the `data` ConfigDict (or any object with the same attributes).

  Raises:
    ValueError: naming the bad field as `data.<field>` and how to fix it.
  """
  source = _get(cfg, "source")
  if source not in SOURCES:
    raise _bad("source", f"got {source!r}; set it to one of "
               f"{', '.join(repr(s) for s in SOURCES)}.")
  _check_scalars(cfg)
  _check_path(cfg, source)


# ------------------------------------------------------------------ sources


def glob_root(pattern: str) -> str:
  """The directory part of `pattern` before its first wildcard.

  Identities are taken relative to it so that moving a whole dataset to
  another directory keeps every document in its split.
  """
  parts = os.path.expanduser(pattern).split(os.sep)
  fixed = []
  for part in parts[:-1]:
    if any(c in part for c in "*?["):
      break
    fixed.append(part)
  return os.sep.join(fixed) or "."


def embedded_files() -> list[tuple[str, str]]:
  """(relative path, absolute path) of the stdlib's .py files, sorted."""
  root = sysconfig.get_paths()["stdlib"]
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
    for name in filenames:
      if name.endswith(".py"):
        full = os.path.join(dirpath, name)
        found.append((os.path.relpath(full, root), full))
  return sorted(found)


def _embedded_documents() -> Iterator[Document]:
  for rel, full in embedded_files():
    with open(full, "rb") as f:
      data = f.read()
    try:
      data.decode("utf-8")
    except UnicodeDecodeError:
      continue
    yield rel, data


def _text_documents(pattern: str) -> Iterator[Document]:
  root = glob_root(pattern)
  for path in match_files(pattern):
    with open(path, "rb") as f:
      yield os.path.relpath(path, root), f.read()


def _jsonl_text(path: str, line_no: int, line: bytes, field: str) -> bytes:
  """The UTF-8 bytes of `field` in one JSONL record, or a clear error."""
  try:
    record = json.loads(line)
  except ValueError as e:
    raise _bad("path", f"'{path}' line {line_no + 1} is not JSON ({e}); fix "
               "the file or drop it from data.path.") from None
  text = record.get(field) if isinstance(record, dict) else None
  if not isinstance(text, str):
    raise _bad("jsonl_field", f"'{path}' line {line_no + 1} has no string "
               f"field {field!r}; fix the file or set data.jsonl_field.")
  return text.encode("utf-8")


def _jsonl_documents(pattern: str, field: str) -> Iterator[Document]:
  root = glob_root(pattern)
  for path in match_files(pattern):
    rel = os.path.relpath(path, root)
    with open(path, "rb") as f:
      for line_no, line in enumerate(f):
        if line.strip():
          yield f"{rel}:{line_no}", _jsonl_text(path, line_no, line, field)


def _capped(docs: Iterator[Document], max_bytes: int) -> Iterator[Document]:
  """Stops once `max_bytes` of documents have been read."""
  total = 0
  for doc in docs:
    yield doc
    total += len(doc[1])
    if total >= max_bytes:
      return


def _is_heldout(identity: str, fraction: float) -> bool:
  digest = hashlib.blake2b(identity.encode("utf-8"), digest_size=8,
                           person=_HASH_PERSON).digest()
  return int.from_bytes(digest, "little") < fraction * 2.0**64


def _pack(docs: list[bytes], name: str, domains: list[int] | None = None) -> PackedStream:
  """[BOS] bytes [EOS] per document, concatenated; `domains`: each document's domain label."""
  tok = ByteTokenizer()
  dtype = np.uint16 if tok.vocab_size < 65536 else np.int32
  pieces = [tok.encode_bytes(d, dtype=dtype) for d in docs]
  lengths = np.array([p.size for p in pieces], np.int64)
  starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
  tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype)
  stream = PackedStream(tokens, starts[:len(pieces)], name=name)
  stream.vocab_size = tok.vocab_size
  if domains is not None:
    stream.doc_domains = np.asarray(domains, np.int32)
  return stream



def _array_split(tokens: np.ndarray, starts: np.ndarray, select: np.ndarray,
                 name: str) -> PackedStream:
  """The selected documents as runs of the base array (no copy)."""
  ends = np.append(starts[1:], tokens.shape[0])
  idx = np.flatnonzero(select)
  if idx.size == 0:
    return PackedStream(tokens[:0], np.zeros(0, np.int64), name=name)
  lengths = ends[idx] - starts[idx]
  doc_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
  # A new run begins wherever the next selected document is not adjacent.
  new_run = np.concatenate([[True], np.diff(idx) != 1])
  run_first = np.flatnonzero(new_run)
  run_last = np.append(run_first[1:], idx.size) - 1
  run_base = starts[idx[run_first]]
  run_lengths = ends[idx[run_last]] - run_base
  return PackedStream(tokens, doc_starts, name=name,
                      run_base=run_base, run_lengths=run_lengths)


def _build_array(cfg: Any) -> tuple[PackedStream, PackedStream]:
  tokens = np.load(match_files(cfg.path)[0], mmap_mode="r")
  starts = _document_starts(tokens, int(cfg.bos_id))
  hashed = splitmix64(np.arange(starts.size)) >> np.uint64(11)
  heldout = hashed < np.uint64(int(cfg.heldout_fraction * 2.0**53))
  return (_array_split(tokens, starts, ~heldout, "train"),
          _array_split(tokens, starts, heldout, "heldout"))


def _read_documents(cfg: Any) -> Iterator[Document]:
  if cfg.source == "embedded":
    return _embedded_documents()
  if cfg.source == "text":
    return _text_documents(cfg.path)
  return _jsonl_documents(cfg.path, cfg.jsonl_field)


def _build_domains(cfg: Any) -> tuple[PackedStream, PackedStream]:
  split = {"train": ([], []), "heldout": ([], [])}
  for identity, data, domain in domains_lib.documents(_embedded_documents(), int(cfg.max_corpus_bytes)):
    docs, labels = split["heldout" if _is_heldout(identity, float(cfg.heldout_fraction)) else "train"]
    docs.append(data)
    labels.append(domain)
  return tuple(_pack(docs, name, labels) for name, (docs, labels) in split.items())


def num_domains(cfg_data: Any) -> int:
  """How many domain labels the configured source gives its tokens (0: none)."""
  return len(domains_lib.DOMAINS) if cfg_data.source == "domains" else 0


def build_splits(cfg: Any) -> tuple[PackedStream, PackedStream]:
  """Reads the configured source once into (train, heldout) streams.

  Args:
    cfg: the `data` config; see `validate_data_config`.

  Returns:
    The train and held-out `PackedStream`s; either may be empty here, the
    caller decides whether it is big enough.
  """
  validate_data_config(cfg)
  begin = time.perf_counter()
  if cfg.source == "array":
    splits = _build_array(cfg)
  elif cfg.source == "domains":
    splits = _build_domains(cfg)
  else:
    train, heldout = [], []
    docs = _capped(_read_documents(cfg), int(cfg.max_corpus_bytes))
    for identity, data in docs:
      held = _is_heldout(identity, float(cfg.heldout_fraction))
      (heldout if held else train).append(data)
    splits = (_pack(train, "train"), _pack(heldout, "heldout"))
  for s in splits:
    logging.info("data %s/%s: %d documents, %d tokens (%.2fs)", cfg.source,
                 s.name, s.num_documents, len(s), time.perf_counter() - begin)
  return splits
