"""Pallas kernels, each in its own folder with a pure-jnp reference beside it.

Every kernel takes `interpret=None`, which runs the Pallas interpreter on CPU and compiles for GPU (Triton)
or TPU (Mosaic) elsewhere, so the same tests run everywhere, and `platform=None`, which picks the kernel variant
('gpu' or 'tpu') from the operands' device, or under jit from the platform lowered for (so an ahead-of-time compile
for TPU on a CPU host gets the Mosaic kernels). Shared by all kernels: platform.py (that choice, one rule for all),
validation.py (argument checks) and tiling.py (tile arithmetic).
"""
from pallas_kernels.flash_attention import flash_attention, FlashBlockSizes
from pallas_kernels.decode_attention import (
    decode_attention, shared_prefix_attention, combine_attention, DecodeBlockSizes)
from pallas_kernels.grouped_matmul import grouped_matmul, GroupedMatmulBlockSizes
