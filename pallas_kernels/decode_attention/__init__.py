"""Attention for batched generation: decode over a KV cache, shared prefix.

decode_attention: T new tokens per sequence over its own cache (split-K).
shared_prefix_attention: every query over one prefix shared by the batch
  (Hydragen), as a matrix-matrix product per kv head.
combine_attention: exact merge of (out, lse) parts over disjoint key sets.
All forward only. reference.py holds pure-jnp references.
"""
from pallas_kernels.decode_attention.block_sizes import DecodeBlockSizes
from pallas_kernels.decode_attention.combine import combine_attention
from pallas_kernels.decode_attention.ops import decode_attention
from pallas_kernels.decode_attention.ops import shared_prefix_attention

__all__ = ["DecodeBlockSizes", "combine_attention", "decode_attention",
           "shared_prefix_attention"]
