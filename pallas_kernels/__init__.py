"""Pallas kernels, each in its own folder with a pure-jnp reference beside it.

Every kernel takes `interpret=None`, which runs the Pallas interpreter on CPU and compiles for GPU (Triton)
or TPU (Mosaic) elsewhere, so the same tests run everywhere.
"""
from pallas_kernels.flash_attention import flash_attention, FlashBlockSizes
from pallas_kernels.decode_attention import (
    decode_attention, shared_prefix_attention, combine_attention, DecodeBlockSizes)
from pallas_kernels.grouped_matmul import grouped_matmul, GroupedMatmulBlockSizes
