"""Tile sizes of the flash-attention kernels.

Block sizes change speed, never the result: any valid choice gives the same
numbers up to float rounding. Sequences are padded internally to a multiple
of the blocks, so a block never has to divide the sequence length.
"""
from __future__ import annotations

import dataclasses

# Triton's tensor cores need every dot dimension >= 16 and every tensor shape
# a power of two; the CPU interpreter runs the same kernel, so it obeys the
# same rule and a test on CPU covers the shapes the GPU will see.
GPU_MIN_BLOCK = 16
# Mosaic tiles vregs as (8 sublanes, 128 lanes); the kv block is the lane axis
# of the logits tile, so TPU blocks are whole multiples of 128.
TPU_BLOCK_MULTIPLE = 128


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
      value = getattr(self, field.name)
      if field.name in ("num_warps", "num_stages"):
        if value is not None and (not _is_int(value) or value < 1):
          raise ValueError(
              f"FlashBlockSizes.{field.name} must be a positive int or None, "
              f"got {value!r}.")
        continue
      if not _is_int(value) or value < 1:
        raise ValueError(
            f"FlashBlockSizes.{field.name} must be a positive int, got "
            f"{value!r}.")

  @property
  def q_blocks(self) -> tuple[int, int, int]:
    return (self.block_q, self.block_q_dkv, self.block_q_dq)

  @property
  def kv_blocks(self) -> tuple[int, int, int]:
    return (self.block_kv, self.block_kv_dkv, self.block_kv_dq)

  @classmethod
  def get_default(cls, backend: str = "gpu") -> FlashBlockSizes:
    """Defaults for a kernel variant ('gpu' also serves the CPU interpreter).

    GPU: 128x64 forward tiles as in FlashAttention-2 on A100/H100; 64x64
    backward tiles keep the two f32 accumulators of dK/dV in registers for
    head_dim 128. TPU: 128 everywhere, the smallest lane-dense tile.
    """
    if backend == "tpu":
      b = TPU_BLOCK_MULTIPLE
      return cls(b, b, b, b, b, b)
    if backend == "gpu":
      return cls()
    raise ValueError(f"backend must be 'gpu' or 'tpu', got {backend!r}.")

  def check_for_backend(self, backend: str) -> None:
    """Raises ValueError if a block size cannot lower on `backend`."""
    for field in dataclasses.fields(self):
      if field.name in ("num_warps", "num_stages"):
        continue
      value = getattr(self, field.name)
      if backend == "gpu":
        if value < GPU_MIN_BLOCK or value & (value - 1):
          raise ValueError(
              f"FlashBlockSizes.{field.name}={value}: GPU/CPU blocks must be "
              f"powers of two >= {GPU_MIN_BLOCK} (Triton tensor shapes and "
              "dot tiles); use e.g. 16, 32, 64 or 128.")
      elif backend == "tpu":
        if value % TPU_BLOCK_MULTIPLE:
          raise ValueError(
              f"FlashBlockSizes.{field.name}={value}: TPU blocks must be "
              f"multiples of {TPU_BLOCK_MULTIPLE} (Mosaic lane width); use "
              "e.g. 128, 256 or 512.")


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)
