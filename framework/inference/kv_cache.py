"""The paged KV cache: device arrays of fixed-size pages, and the host-side pool that hands pages out.

K and V live in [layers, pages, page_size, kv_heads, head_dim] arrays; a sequence owns a list of pages (its row
of the page table), so the memory a sequence holds grows with its tokens, not with the context length. Page 0
is scratch: padding tokens write there and unused page-table entries point there, so no step needs a branch.

Pages of a prompt prefix are shared: every full page of prompt tokens is registered under a hash of all the
tokens up to its end, and a later prompt with the same tokens takes the page (its reference count goes up)
instead of computing it again. A page returns to the free list when its last holder lets it go.
"""
from __future__ import annotations

import dataclasses
import hashlib

import jax
import jax.numpy as jnp
import numpy as np

SCRATCH_PAGE = 0


@dataclasses.dataclass
class KVCache:
  """K and V pages, [layers, pages, page_size, kv_heads, head_dim] each."""
  k: jax.Array
  v: jax.Array


jax.tree_util.register_dataclass(KVCache, data_fields=['k', 'v'], meta_fields=[])


def cache_names() -> tuple:
  """Logical axis names of a K or V page array: kv heads split like the attention's (tensor parallel)."""
  return ('layers', None, None, 'kv_heads', 'head_dim')


def init_cache(model_cfg, num_pages: int, page_size: int, sharding=None) -> KVCache:
  shape = (model_cfg.n_layers, num_pages, page_size, model_cfg.n_kv_heads, model_cfg.head_dim)
  zeros = jax.jit(lambda: jnp.zeros(shape, jnp.dtype(model_cfg.dtype)), out_shardings=sharding)
  return KVCache(zeros(), zeros())


def cache_bytes_per_page(model_cfg, page_size: int) -> int:
  return 2 * model_cfg.n_layers * page_size * model_cfg.n_kv_heads * model_cfg.head_dim * \
      jnp.dtype(model_cfg.dtype).itemsize


def bucket(n: int, cap: int) -> int:
  """Page-table widths compile in powers of two (at most `cap`), so a step compiles once per bucket."""
  return min(cap, 1 << max(0, (max(n, 1) - 1).bit_length()))


def page_keys(tokens, page_size: int, count: int) -> list[bytes]:
  """Keys of the first `count` full pages of `tokens`: page j's key hashes every token up to its end (a chain),
  so two prompts share page j only if they agree on all tokens before it too."""
  keys, digest = [], b''
  arr = np.asarray(tokens, np.int64)
  for j in range(count):
    digest = hashlib.blake2b(digest + arr[j * page_size:(j + 1) * page_size].tobytes(), digest_size=16).digest()
    keys.append(digest)
  return keys


class PagePool:
  """Free list, reference counts and the prefix registry of the KV pages (host side)."""

  def __init__(self, num_pages: int, page_size: int):
    if num_pages < 2:
      raise ValueError(f'a KV pool needs at least 2 pages (page 0 is scratch), got {num_pages}')
    self.num_pages, self.page_size = num_pages, page_size
    self._free = list(range(num_pages - 1, SCRATCH_PAGE, -1))  # pop() hands out low ids first
    self._refs = np.zeros(num_pages, np.int32)
    self._by_key: dict[bytes, int] = {}
    self._key_of: dict[int, bytes] = {}
    self.peak_used = 0

  @property
  def capacity(self) -> int:
    return self.num_pages - 1

  @property
  def free(self) -> int:
    return len(self._free)

  @property
  def used(self) -> int:
    return self.capacity - self.free

  def allocate(self, n: int) -> list[int] | None:
    """n fresh pages (reference count 1), or None (and nothing taken) when fewer than n are free."""
    if n > len(self._free):
      return None
    pages = [self._free.pop() for _ in range(n)]
    self._refs[pages] = 1
    self.peak_used = max(self.peak_used, self.used)
    return pages

  def share(self, page: int) -> None:
    if self._refs[page] <= 0:
      raise RuntimeError(f'page {page} is not held by anyone; it cannot be shared')
    self._refs[page] += 1

  def release(self, pages) -> None:
    for page in pages:
      if self._refs[page] <= 0:
        raise RuntimeError(f'page {page} released more often than it was taken')
      self._refs[page] -= 1
      if self._refs[page] == 0:
        key = self._key_of.pop(page, None)
        if key is not None:
          del self._by_key[key]
        self._free.append(page)

  def register(self, page: int, key: bytes) -> None:
    """Offers a computed page of prompt tokens for sharing under `key` (a no-op if the key is taken)."""
    if key not in self._by_key and page not in self._key_of:
      self._by_key[key] = page
      self._key_of[page] = key

  def lookup(self, key: bytes) -> int | None:
    return self._by_key.get(key)

  def refcount(self, page: int) -> int:
    return int(self._refs[page])
