"""Public grouped matmul: validation, dispatch, and the custom VJP."""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels import platform as platform_lib
from pallas_kernels import validation
from pallas_kernels.grouped_matmul import kernel_gpu
from pallas_kernels.grouped_matmul import kernel_tpu
from pallas_kernels.grouped_matmul import metadata
from pallas_kernels.grouped_matmul.block_sizes import GroupedMatmulBlockSizes

_KERNELS = {"gpu": kernel_gpu, "tpu": kernel_tpu}


def _check_options(block_sizes, preferred_element_type):
  validation.check_block_sizes(block_sizes, GroupedMatmulBlockSizes)
  if preferred_element_type is not None and not jnp.issubdtype(
      jnp.dtype(preferred_element_type), jnp.floating):
    raise ValueError("preferred_element_type must be None or a float dtype, "
                     f"got {preferred_element_type!r}.")


def _check_group_sizes(group_sizes, num_groups: int, what: str) -> None:
  validation.check_int_vector("group_sizes", group_sizes, "[num_groups]",
                              "rows per group")
  if group_sizes.shape[0] != num_groups:
    raise ValueError(
        f"group_sizes has {group_sizes.shape[0]} groups but {what} has "
        f"{num_groups}; they must match.")
  if num_groups < 1:
    raise ValueError("group_sizes must hold at least one group.")


@functools.partial(jax.jit, static_argnames=(
    "transpose_rhs", "out_dtype", "block_sizes", "interpret", "platform"))
def _gmm(x, w, group_sizes, *, transpose_rhs, out_dtype, block_sizes,
         interpret, platform):
  offsets = metadata.group_offsets(group_sizes.astype(jnp.int32), x.shape[0])
  return _KERNELS[platform].gmm(
      x, w, offsets, transpose_rhs=transpose_rhs, out_dtype=out_dtype,
      block_sizes=block_sizes, interpret=interpret)


@functools.partial(jax.jit, static_argnames=(
    "out_dtype", "block_sizes", "interpret", "platform"))
def _tgmm(x, dy, group_sizes, *, out_dtype, block_sizes, interpret, platform):
  offsets = metadata.group_offsets(group_sizes.astype(jnp.int32), x.shape[0])
  return _KERNELS[platform].tgmm(x, dy, offsets, out_dtype=out_dtype,
                                 block_sizes=block_sizes, interpret=interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _gmm_vjp(x, w, group_sizes, out_dtype, block_sizes, interpret, platform):
  return _gmm(x, w, group_sizes, transpose_rhs=False, out_dtype=out_dtype,
              block_sizes=block_sizes, interpret=interpret, platform=platform)


def _gmm_vjp_fwd(x, w, group_sizes, out_dtype, block_sizes, interpret,
                 platform):
  out = _gmm_vjp(x, w, group_sizes, out_dtype, block_sizes, interpret,
                 platform)
  return out, (x, w, group_sizes)


def _gmm_vjp_bwd(out_dtype, block_sizes, interpret, platform, residuals, dy):
  del out_dtype
  x, w, group_sizes = residuals
  dy = dy.astype(x.dtype)
  # dx_g = dy_g @ w_g^T: the same kernel reading w transposed in place.
  dx = _gmm(dy, w, group_sizes, transpose_rhs=True, out_dtype=x.dtype,
            block_sizes=block_sizes, interpret=interpret, platform=platform)
  dw = _tgmm(x, dy, group_sizes, out_dtype=w.dtype, block_sizes=block_sizes,
             interpret=interpret, platform=platform)
  return dx, dw, None


_gmm_vjp.defvjp(_gmm_vjp_fwd, _gmm_vjp_bwd)


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *,
                   block_sizes: GroupedMatmulBlockSizes | None = None,
                   interpret: Any = None,
                   preferred_element_type=None,
                   platform: str | None = None) -> jax.Array:
  """Grouped (ragged) matmul: rows of group g times the weight of group g.

  Same maths as jax.lax.ragged_dot(x, w, group_sizes). Differentiable in x
  and w through kernels: dx = grouped_matmul(dy, w^T) and
  dw = transposed_grouped_matmul(x, dy); group_sizes gets no gradient.

  Args:
    x: [M, K], rows grouped contiguously (group 0 first).
    w: [G, K, N], one weight per group.
    group_sizes: int32 [G] rows per group, sum <= M. Rows past the sum give
      zeros; a sum above M truncates the last groups at M. Empty groups are
      fine.
    block_sizes: tiling; default GroupedMatmulBlockSizes().
    interpret: None = interpreter on CPU, compiled on GPU (Triton) / TPU;
      True/False force it; a pallas InterpretParams picks that interpreter.
    preferred_element_type: output dtype; default the promoted input dtype.
      Accumulation is always f32.
    platform: None = the variant for the operands' device, or under jit for
      the platform lowered for ('tpu' on TPU, else 'gpu'); 'gpu' or 'tpu'
      picks the Triton- or Mosaic-shaped variant (e.g. to test it in the
      interpreter).

  Returns:
    [M, N].

  Raises:
    ValueError: on bad shapes, dtypes or options, before anything compiles.
  """
  validation.check_rank("x", x, 2, "[M, K]")
  validation.check_rank("w", w, 3, "[G, K, N]")
  if x.shape[1] != w.shape[1]:
    raise ValueError(
        f"x has K={x.shape[1]} but w has K={w.shape[1]} (w is [G, K, N]); "
        "the contraction dims must match.")
  validation.check_float("x", x)
  validation.check_float("w", w)
  _check_group_sizes(group_sizes, w.shape[0], "w")
  _check_options(block_sizes, preferred_element_type)
  platform_lib.check(interpret, platform)
  dtype = jnp.result_type(x.dtype, w.dtype)
  out_dtype = jnp.dtype(preferred_element_type or dtype)
  if 0 in (x.shape[0], x.shape[1], w.shape[2]):
    return jnp.zeros((x.shape[0], w.shape[2]), out_dtype)
  blocks = block_sizes or GroupedMatmulBlockSizes()
  variant = lambda x, w, gs, *, interpret, platform: _gmm_vjp(
      x, w, gs, out_dtype, blocks, interpret, platform)
  return platform_lib.dispatch(
      variant, (x.astype(dtype), w.astype(dtype), group_sizes),
      interpret=interpret, platform=platform, anchors=(x, w))


def transposed_grouped_matmul(
    x: jax.Array, dy: jax.Array, group_sizes: jax.Array, *,
    block_sizes: GroupedMatmulBlockSizes | None = None,
    interpret: Any = None, preferred_element_type=None,
    platform: str | None = None) -> jax.Array:
  """Per-group x_g^T @ dy_g -> [G, K, N]: the weight gradient kernel.

  Forward only (it is itself the backward of grouped_matmul).

  Args:
    x: [M, K], rows grouped contiguously.
    dy: [M, N], same row grouping.
    group_sizes: int32 [G]; groups with zero rows give zero matrices.
    block_sizes: tiling; default GroupedMatmulBlockSizes().
    interpret: None = interpreter on CPU, compiled on GPU / TPU.
    preferred_element_type: output dtype; default the promoted input dtype.
    platform: None, 'gpu' or 'tpu' (see grouped_matmul).

  Returns:
    [G, K, N].

  Raises:
    ValueError: on bad shapes, dtypes or options.
  """
  validation.check_rank("x", x, 2, "[M, K]")
  validation.check_rank("dy", dy, 2, "[M, N]")
  if x.shape[0] != dy.shape[0]:
    raise ValueError(
        f"x has M={x.shape[0]} rows but dy has {dy.shape[0]}; they must match.")
  validation.check_float("x", x)
  validation.check_float("dy", dy)
  num_groups = group_sizes.shape[0] if getattr(group_sizes, "ndim", 0) else -1
  _check_group_sizes(group_sizes, num_groups, "group_sizes")
  _check_options(block_sizes, preferred_element_type)
  platform_lib.check(interpret, platform)
  dtype = jnp.result_type(x.dtype, dy.dtype)
  out_dtype = jnp.dtype(preferred_element_type or dtype)
  k, n = x.shape[1], dy.shape[1]
  if x.shape[0] == 0 or k == 0 or n == 0:
    return jnp.zeros((num_groups, k, n), out_dtype)
  variant = functools.partial(
      _tgmm, out_dtype=out_dtype,
      block_sizes=block_sizes or GroupedMatmulBlockSizes())
  return platform_lib.dispatch(
      variant, (x.astype(dtype), dy.astype(dtype), group_sizes),
      interpret=interpret, platform=platform, anchors=(x, dy))
