"""The project's own permutation of [0, n), so a seed's data order never changes with a NumPy upgrade.

`keyed_permutation(seed, epoch, n)` is a keyed Feistel network with cycle walking, built from splitmix64; both
are pinned by tests (tests/test_data.py). Changing either changes every run's example order: bump
framework.corpus.ORDER_VERSION with it, so resumes across the change are refused.
"""
from __future__ import annotations

from typing import Any

import numpy as np


def _is_int(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def splitmix64(x: np.ndarray) -> np.ndarray:
  """A stable, well-mixed 64-bit hash of each integer, vectorised."""
  z = x.astype(np.uint64) + _GOLDEN
  _splitmix64_finish(z, np.empty_like(z))
  return z


def _splitmix64_finish(z: np.ndarray, scratch: np.ndarray) -> None:
  """splitmix64 after its `+ golden` step, in place on uint64 `z`.

  In place (with a caller's scratch buffer) because the permutation below
  runs it several times over every index, and temporaries dominated.
  """
  np.right_shift(z, np.uint64(30), out=scratch)
  z ^= scratch
  z *= np.uint64(0xBF58476D1CE4E5B9)
  np.right_shift(z, np.uint64(27), out=scratch)
  z ^= scratch
  z *= np.uint64(0x94D049BB133111EB)
  np.right_shift(z, np.uint64(31), out=scratch)
  z ^= scratch


# Rounds of the Feistel network in `keyed_permutation`; each round rewrites
# one half. Luby-Rackoff needs 4 for a strong pseudo-random permutation from
# random round functions; 6 leaves a margin (1-2 rounds fail the shuffle
# tests in tests/test_data.py). The whole order of 1e7 indices takes ~1.5 s
# of one core; a batch's few slots take about a millisecond.
_PERM_ROUNDS = 6
# Indices per vectorised pass: small enough that a pass's arrays stay in
# cache, which made it 1.5-2x faster than whole-array passes at n = 1e7.
_PERM_CHUNK = 1 << 16
_MAX_U64 = (1 << 64) - 1


def _round_keys(seed: int, epoch: int) -> np.ndarray:
  """Round r's key is splitmix64(splitmix64(splitmix64(seed) ^ epoch) ^ r+1)."""
  k = splitmix64(np.array([seed], np.uint64))
  k = splitmix64(k ^ np.uint64(epoch))
  return splitmix64(k ^ np.arange(1, _PERM_ROUNDS + 1, dtype=np.uint64))


def _feistel(x: np.ndarray, keys_plus_golden: np.ndarray, lo_bits: int,
             hi_bits: int) -> np.ndarray:
  """One pass of the Feistel network over uint64 indices < 2**(lo+hi bits).

  Even rounds do hi ^= F_r(lo), odd rounds lo ^= F_r(hi), with
  F_r(v) = splitmix64(v + key_r) masked to the half being rewritten; each
  round is its own inverse, so the pass is a bijection of the domain.
  """
  lo_mask = np.uint64((1 << lo_bits) - 1)
  hi_mask = np.uint64((1 << hi_bits) - 1)
  hi = x >> np.uint64(lo_bits)
  lo = x & lo_mask
  f = np.empty_like(x)
  scratch = np.empty_like(x)
  for r, key in enumerate(keys_plus_golden):
    src, dst, mask = (lo, hi, hi_mask) if r % 2 == 0 else (hi, lo, lo_mask)
    # splitmix64(v + key) begins with + golden: both additions in one pass.
    np.add(src, key, out=f)
    _splitmix64_finish(f, scratch)
    f &= mask
    dst ^= f
  hi <<= np.uint64(lo_bits)
  hi |= lo
  return hi


def _check_u64(name: str, value: Any) -> None:
  if not _is_int(value) or not 0 <= value <= _MAX_U64:
    raise ValueError(f"{name} must be an int in [0, 2**64), got {value!r}.")


def keyed_permutation(seed: int, epoch: int, n: int,
                      slots: np.ndarray | None = None) -> np.ndarray:
  """perm[slots] (or all of perm) for a permutation `perm` of [0, n).

  The project's own shuffle, so the data order of a seed never changes with
  a NumPy upgrade: a keyed Feistel network on [0, 2**b), the smallest
  power-of-two domain holding n (b >= 1), split into a low half of b // 2
  bits and a high half of the rest, with round keys from (seed, epoch) (see
  `_round_keys` and `_feistel`). Values >= n are walked on through the
  network until they land in [0, n) ("cycle walking"), which keeps it a
  bijection of [0, n). Each entry is computed on its own, so asking for a
  batch's slots costs about a millisecond whatever n is.

  Args:
    seed, epoch: ints in [0, 2**64).
    n: the number of items, in [0, 2**62].
    slots: optional integer array (any shape) of positions in [0, n).

  Returns:
    int64 array: perm (shape [n]) or perm[slots] (the shape of `slots`).
  """
  _check_u64("seed", seed)
  _check_u64("epoch", epoch)
  if not _is_int(n) or not 0 <= n <= 1 << 62:
    raise ValueError(f"n must be an int in [0, 2**62], got {n!r}.")
  n = int(n)
  if slots is None:
    slots = np.arange(n, dtype=np.int64)
  else:
    slots = np.asarray(slots)
    if slots.size and not np.issubdtype(slots.dtype, np.integer):
      raise ValueError(f"slots must be integers, got dtype {slots.dtype}.")
    if slots.size and (slots.min() < 0 or slots.max() >= n):
      raise ValueError(f"slots must lie in [0, n={n}), got values in "
                       f"[{slots.min()}, {slots.max()}].")
  flat = slots.reshape(-1).astype(np.uint64)
  out = np.empty(flat.shape, np.int64)
  bits = max(1, (n - 1).bit_length())
  lo_bits = bits // 2
  keys = _round_keys(int(seed), int(epoch)) + _GOLDEN
  limit = np.uint64(n)
  for begin in range(0, flat.size, _PERM_CHUNK):
    y = _feistel(flat[begin:begin + _PERM_CHUNK], keys, lo_bits,
                 bits - lo_bits)
    # Ends: a value's cycle in the domain passes through its start, < n.
    walking = np.flatnonzero(y >= limit)
    while walking.size:
      y[walking] = _feistel(y[walking], keys, lo_bits, bits - lo_bits)
      walking = walking[y[walking] >= limit]
    out[begin:begin + _PERM_CHUNK] = y
  return out.reshape(slots.shape)
