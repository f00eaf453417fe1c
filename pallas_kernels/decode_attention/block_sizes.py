"""Block sizes for the decode kernels."""
from __future__ import annotations

import dataclasses

from pallas_kernels import validation


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
      validation.check_power_of_two(
          f"DecodeBlockSizes.{name}", getattr(self, name), minimum=8,
          example="16, 64 or 128")
    validation.check_int("DecodeBlockSizes.num_splits", self.num_splits,
                         allow_none=True)
    validation.check_power_of_two("DecodeBlockSizes.num_warps",
                                  self.num_warps, maximum=32)
    validation.check_int("DecodeBlockSizes.num_stages", self.num_stages)
