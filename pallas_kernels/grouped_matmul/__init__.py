"""Grouped (ragged) matmul for dropless MoE experts and diagonal batching.

grouped_matmul(x, w, group_sizes): rows grouped contiguously, one weight per
group (jax.lax.ragged_dot semantics), with a kernel backward.
transposed_grouped_matmul(x, dy, group_sizes): per-group x_g^T dy_g (dw).
reference.py holds explicit pure-jnp references.
"""
from pallas_kernels.grouped_matmul.block_sizes import GroupedMatmulBlockSizes
from pallas_kernels.grouped_matmul.ops import grouped_matmul
from pallas_kernels.grouped_matmul.ops import transposed_grouped_matmul

__all__ = ["GroupedMatmulBlockSizes", "grouped_matmul",
           "transposed_grouped_matmul"]
