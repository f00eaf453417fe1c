"""Block sizes for the grouped matmul kernels."""
from __future__ import annotations

import dataclasses

from pallas_kernels import validation


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
      validation.check_power_of_two(
          f"GroupedMatmulBlockSizes.{name}", getattr(self, name), minimum=8,
          example="16, 128 or 256")
    validation.check_power_of_two("GroupedMatmulBlockSizes.num_warps",
                                  self.num_warps, maximum=32)
    validation.check_int("GroupedMatmulBlockSizes.num_stages",
                         self.num_stages)
