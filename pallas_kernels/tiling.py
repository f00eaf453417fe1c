"""Tile arithmetic shared by the kernels' Triton and Mosaic variants."""
from __future__ import annotations

import jax.numpy as jnp

# Triton's tensor cores need every dot dimension >= 16 and every tensor shape
# a power of two. The CPU interpreter runs the same (GPU) bodies, so it obeys
# the same rule and a test on CPU covers the shapes the GPU will see.
TRITON_MIN_TILE = 16
# Mosaic tiles vregs as (sublanes, 128 lanes): the minor dim of a block is a
# multiple of 128 or the whole array dim.
LANES = 128


def round_up(n: int, m: int) -> int:
  """The smallest multiple of m that is >= n."""
  return -(-n // m) * m


def next_pow2(n: int) -> int:
  """The smallest power of two >= n (1 for n <= 1)."""
  return 1 << max(n - 1, 0).bit_length()


def sublanes(dtype) -> int:
  """Mosaic's native second-minor tiling: 8 rows of 32-bit, 16 of 16-bit,
  32 of 8-bit values."""
  return 8 * (4 // jnp.dtype(dtype).itemsize)
