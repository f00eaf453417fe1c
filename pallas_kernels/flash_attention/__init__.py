"""Flash attention (FlashAttention-2) as Pallas kernels, forward and backward.

    from pallas_kernels.flash_attention import flash_attention
    out = flash_attention(q, k, v, causal=True, segment_ids=ids)

Files: api.py (entry point, custom_vjp, padding), validation.py (argument
checks), block_sizes.py (tile sizes), kernel_math.py (maths shared by both
variants), forward.py / backward.py (GPU Triton variant, also run by the CPU
interpreter), tpu_forward.py / tpu_backward.py (TPU Mosaic variant),
reference.py (pure-jnp ground truth).
"""
from pallas_kernels.flash_attention.api import flash_attention
from pallas_kernels.flash_attention.block_sizes import FlashBlockSizes
from pallas_kernels.flash_attention.reference import attention_reference

__all__ = ["flash_attention", "FlashBlockSizes", "attention_reference"]
