"""Block sizes for the decode kernels and the choice of Pallas lowering."""
from __future__ import annotations

import dataclasses

import jax

_PLATFORMS = ("gpu", "tpu")


def _is_power_of_two(n: int) -> bool:
  return n > 0 and (n & (n - 1)) == 0


@dataclasses.dataclass(frozen=True)
class DecodeBlockSizes:
  """Tiling of `decode_attention` and `shared_prefix_attention`.

  Attributes:
    block_kv: keys per inner step (one q.k^T tile). Power of two >= 8. The GPU
      path raises it to 16 (the smallest Triton dot); the TPU path uses the
      whole cache when it is shorter than one block.
    block_rows: query rows per program for shared-prefix attention, where all
      queries of a kv head are stacked (batch * T * heads_per_kv_head rows).
      Decode puts the T * heads_per_kv_head rows of one sequence in a single
      block and ignores this. Power of two >= 8.
    num_splits: GPU only: how many parallel slices the key axis is cut into
      (flash-decoding). None picks enough to fill the device. The TPU path
      walks the keys sequentially and ignores it.
    num_warps: GPU only: Triton warps per program.
    num_stages: GPU only: Triton software-pipelining depth.
  """
  block_kv: int = 128
  block_rows: int = 64
  num_splits: int | None = None
  num_warps: int = 4
  num_stages: int = 2

  def __post_init__(self):
    for name in ("block_kv", "block_rows"):
      value = getattr(self, name)
      if not isinstance(value, int) or not _is_power_of_two(value) or value < 8:
        raise ValueError(
            f"DecodeBlockSizes.{name} must be a power of two >= 8, got "
            f"{value!r}; e.g. 16, 64 or 128.")
    if self.num_splits is not None and (
        not isinstance(self.num_splits, int) or self.num_splits < 1):
      raise ValueError(
          "DecodeBlockSizes.num_splits must be None (auto) or an int >= 1, "
          f"got {self.num_splits!r}.")
    if not isinstance(self.num_warps, int) or not _is_power_of_two(
        self.num_warps) or self.num_warps > 32:
      raise ValueError(
          f"DecodeBlockSizes.num_warps must be a power of two in [1, 32], got "
          f"{self.num_warps!r}.")
    if not isinstance(self.num_stages, int) or self.num_stages < 1:
      raise ValueError(
          f"DecodeBlockSizes.num_stages must be an int >= 1, got "
          f"{self.num_stages!r}.")


def resolve_platform(interpret: bool | None, platform: str | None
                     ) -> tuple[bool, str]:
  """Fills in `interpret` and `platform` from the default backend.

  On CPU there is no compiler for Pallas, so None means the interpreter; the
  GPU body is the default there because its masked loads exercise every edge
  case. `platform='tpu'` with interpret=True runs the Mosaic-shaped variant in
  the generic interpreter.

  Args:
    interpret: None, True or False.
    platform: None, 'gpu' (Triton lowering) or 'tpu' (Mosaic lowering).

  Returns:
    (interpret, platform) with no None left.
  """
  if interpret is not None and not isinstance(interpret, bool):
    raise ValueError(f"interpret must be None or a bool, got {interpret!r}.")
  if platform is not None and platform not in _PLATFORMS:
    raise ValueError(
        f"platform must be None, 'gpu' or 'tpu', got {platform!r}.")
  backend = jax.default_backend()
  if interpret is None:
    interpret = backend not in ("gpu", "cuda", "rocm", "tpu")
  if platform is None:
    platform = "tpu" if backend == "tpu" else "gpu"
  return interpret, platform
