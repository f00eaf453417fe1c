"""Block sizes for the grouped matmul kernels and the choice of lowering."""
from __future__ import annotations

import dataclasses

import jax

_PLATFORMS = ("gpu", "tpu")


def _is_power_of_two(n) -> bool:
  return isinstance(n, int) and n > 0 and (n & (n - 1)) == 0


@dataclasses.dataclass(frozen=True)
class GroupedMatmulBlockSizes:
  """Tiling of `grouped_matmul` and `transposed_grouped_matmul`.

  Attributes:
    tm: rows of x per tile. Power of two >= 8.
    tk: contraction (K) per step. Power of two >= 8.
    tn: output columns per tile. Power of two >= 8.
    num_warps: GPU only: Triton warps per program.
    num_stages: GPU only: Triton software-pipelining depth.

  The GPU path raises every tile to >= 16 (the smallest Triton dot). The TPU
  path rounds tm up to the dtype's sublane tiling (8 for 32-bit, 16 for bf16)
  and tk, tn up to multiples of 128 unless one tile covers the whole dim.
  """
  tm: int = 128
  tk: int = 64  # Triton: 3 stages of 128x64 + 64x128 bf16 tiles = 96 KiB smem
  tn: int = 128
  num_warps: int = 4
  num_stages: int = 3

  def __post_init__(self):
    for name in ("tm", "tk", "tn"):
      value = getattr(self, name)
      if not _is_power_of_two(value) or value < 8:
        raise ValueError(
            f"GroupedMatmulBlockSizes.{name} must be a power of two >= 8, got "
            f"{value!r}; e.g. 16, 128 or 256.")
    if not _is_power_of_two(self.num_warps) or self.num_warps > 32:
      raise ValueError(
          "GroupedMatmulBlockSizes.num_warps must be a power of two in "
          f"[1, 32], got {self.num_warps!r}.")
    if not isinstance(self.num_stages, int) or self.num_stages < 1:
      raise ValueError(
          "GroupedMatmulBlockSizes.num_stages must be an int >= 1, got "
          f"{self.num_stages!r}.")


def resolve_platform(interpret: bool | None, platform: str | None
                     ) -> tuple[bool, str]:
  """(interpret, platform) with the defaults filled from the default backend.

  None interpret = the interpreter on CPU (no Pallas compiler there),
  compiled elsewhere. None platform = 'tpu' on TPU, else 'gpu' (the masked
  Triton-shaped body, which the CPU interpreter also runs).
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
