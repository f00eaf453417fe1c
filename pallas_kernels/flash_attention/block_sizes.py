"""Tile sizes of the flash-attention kernels.

Block sizes change speed, never the result: any valid choice gives the same
numbers up to float rounding. Sequences are padded internally to a multiple
of the blocks, so a block never has to divide the sequence length.
"""
from __future__ import annotations

import dataclasses

from pallas_kernels import validation
from pallas_kernels.tiling import LANES
from pallas_kernels.tiling import TRITON_MIN_TILE

_TRITON_KNOBS = ("num_warps", "num_stages")


@dataclasses.dataclass(frozen=True)
class FlashBlockSizes:
  """Tile sizes for the forward and the two backward kernels.

  Attributes:
    block_q: query rows per program in the forward kernel.
    block_kv: key/value rows per inner step in the forward kernel.
    block_q_dkv: query rows per inner step of the dK/dV kernel.
    block_kv_dkv: key/value rows per program of the dK/dV kernel.
    block_q_dq: query rows per program of the dQ kernel.
    block_kv_dq: key/value rows per inner step of the dQ kernel.
    num_warps: Triton warps per program (GPU only); None picks by head dim.
    num_stages: Triton software-pipelining depth (GPU only); None picks 2.
  """
  block_q: int = 128
  block_kv: int = 64
  block_q_dkv: int = 64
  block_kv_dkv: int = 64
  block_q_dq: int = 64
  block_kv_dq: int = 64
  num_warps: int | None = None
  num_stages: int | None = None

  def __post_init__(self):
    for field in dataclasses.fields(self):
      validation.check_int(f"FlashBlockSizes.{field.name}",
                           getattr(self, field.name),
                           allow_none=field.name in _TRITON_KNOBS)

  @property
  def q_blocks(self) -> tuple[int, int, int]:
    return (self.block_q, self.block_q_dkv, self.block_q_dq)

  @property
  def kv_blocks(self) -> tuple[int, int, int]:
    return (self.block_kv, self.block_kv_dkv, self.block_kv_dq)

  @classmethod
  def get_default(cls, platform: str = "gpu") -> FlashBlockSizes:
    """Defaults for a kernel variant ('gpu' also serves the CPU interpreter).

    GPU: 128x64 forward tiles as in FlashAttention-2 on A100/H100; 64x64
    backward tiles keep the two f32 accumulators of dK/dV in registers for
    head_dim 128. TPU: 128 everywhere, the smallest lane-dense tile.
    """
    if platform == "tpu":
      return cls(LANES, LANES, LANES, LANES, LANES, LANES)
    if platform == "gpu":
      return cls()
    raise ValueError(f"platform must be 'gpu' or 'tpu', got {platform!r}.")

  def check_for_platform(self, platform: str) -> None:
    """Raises ValueError if a block size cannot lower for `platform`."""
    for field in dataclasses.fields(self):
      if field.name in _TRITON_KNOBS:
        continue
      value = getattr(self, field.name)
      if platform == "gpu":
        if value < TRITON_MIN_TILE or not validation.is_power_of_two(value):
          raise ValueError(
              f"FlashBlockSizes.{field.name}={value}: GPU/CPU blocks must be "
              f"powers of two >= {TRITON_MIN_TILE} (Triton tensor shapes and "
              "dot tiles); use e.g. 16, 32, 64 or 128.")
      elif platform == "tpu":
        # The kv block is the lane axis of the logits tile, so TPU blocks
        # are whole multiples of the lane width.
        if value % LANES:
          raise ValueError(
              f"FlashBlockSizes.{field.name}={value}: TPU blocks must be "
              f"multiples of {LANES} (Mosaic lane width); use e.g. 128, 256 "
              "or 512.")
