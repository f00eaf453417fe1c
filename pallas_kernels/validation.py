"""Argument checks shared by the kernels' entry points and block sizes.

They look at shapes, dtypes and Python values only, so a bad call fails with
a ValueError that names the argument (and the fix) before anything is traced
or compiled. Checks that only one kernel needs live beside that kernel.
"""
from __future__ import annotations

import math
import numbers

import jax.numpy as jnp


def _is_int(value) -> bool:
  # A bool is an int to Python but never a meaningful size.
  return isinstance(value, int) and not isinstance(value, bool)


def is_power_of_two(value) -> bool:
  """True for a Python int 1, 2, 4, ..."""
  return _is_int(value) and value > 0 and (value & (value - 1)) == 0


def check_int(name: str, value, *, minimum: int = 1,
              allow_none: bool = False) -> None:
  """`value` must be a Python int >= minimum (or None if allowed)."""
  if allow_none and value is None:
    return
  if not _is_int(value) or value < minimum:
    none = "None or " if allow_none else ""
    raise ValueError(
        f"{name} must be {none}an int >= {minimum}, got {value!r}.")


def check_power_of_two(name: str, value, *, minimum: int = 1,
                       maximum: int | None = None,
                       example: str | None = None) -> None:
  """`value` must be a power of two in [minimum, maximum]."""
  if (is_power_of_two(value) and value >= minimum
      and (maximum is None or value <= maximum)):
    return
  bounds = (f">= {minimum}" if maximum is None
            else f"in [{minimum}, {maximum}]")
  hint = f"; e.g. {example}" if example else ""
  raise ValueError(
      f"{name} must be a power of two {bounds}, got {value!r}{hint}.")


def check_block_sizes(block_sizes, cls: type) -> None:
  """`block_sizes` must be None (the defaults) or an instance of `cls`."""
  if block_sizes is not None and not isinstance(block_sizes, cls):
    raise ValueError(f"block_sizes must be None or a {cls.__name__}, got "
                     f"{type(block_sizes)}.")


def check_sm_scale(sm_scale) -> None:
  """`sm_scale` must be None or a finite Python number (a static argument)."""
  if sm_scale is None:
    return
  if (not isinstance(sm_scale, numbers.Real) or isinstance(sm_scale, bool)
      or not math.isfinite(sm_scale)):
    raise ValueError(
        f"sm_scale must be a finite Python number (it is baked into the "
        f"kernel) or None for 1/sqrt(head_dim), got {sm_scale!r}.")


def check_rank(name: str, x, rank: int, layout: str, hint: str = "") -> None:
  """`x` must be an array of `rank` dims, laid out as `layout`.

  Args:
    name: the argument's name in the message.
    x: the argument.
    rank: the number of dims it must have.
    layout: its dims in words, e.g. "[batch, seq, heads, head_dim]".
    hint: appended to the rank message, e.g. "; add a batch axis".
  """
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise ValueError(f"{name} must be an array {layout}, got {type(x)}.")
  if len(x.shape) != rank:
    raise ValueError(f"{name} must be {rank}-D {layout}, got shape "
                     f"{tuple(x.shape)}{hint}.")


def check_float(name: str, x, dtypes=None) -> None:
  """`x` must have a floating dtype (one of `dtypes` if given)."""
  if dtypes is None:
    ok, kinds = jnp.issubdtype(x.dtype, jnp.floating), "float"
  else:
    allowed = [jnp.dtype(d) for d in dtypes]
    ok = jnp.dtype(x.dtype) in allowed
    names = [d.name for d in allowed]
    kinds = ", ".join(names[:-1]) + " or " + names[-1]
  if not ok:
    raise ValueError(f"{name} must be a {kinds} array, got dtype {x.dtype}; "
                     f"cast {name} first.")


def check_same_shape(a_name: str, a, b_name: str, b) -> None:
  """Two arrays (e.g. keys and values) must have one shape."""
  if tuple(a.shape) != tuple(b.shape):
    raise ValueError(
        f"{a_name} and {b_name} must have the same shape, got {a_name} "
        f"{tuple(a.shape)} and {b_name} {tuple(b.shape)}.")


def check_same_dtype(arrays: dict, fix: str) -> None:
  """Arrays given as {name: array} must share a dtype; `fix` says how."""
  dtypes = {name: x.dtype for name, x in arrays.items()}
  if len(set(dtypes.values())) > 1:
    names = list(dtypes)
    got = ", ".join(f"{name} {dtype}" for name, dtype in dtypes.items())
    raise ValueError(
        f"{', '.join(names[:-1])} and {names[-1]} must share a dtype, got "
        f"{got}; {fix}.")


def check_gqa_heads(q_heads: int, kv_heads: int, kv_name: str) -> None:
  """Query heads must be a multiple of the kv heads (GQA/MQA).

  Args:
    q_heads: query heads.
    kv_heads: key/value heads.
    kv_name: how the message names the kv head count, e.g. "k/v heads".
  """
  if kv_heads < 1 or q_heads % kv_heads:
    raise ValueError(
        f"q heads ({q_heads}) must be a multiple of {kv_name} ({kv_heads}) "
        "for GQA/MQA; repeat the kv heads or use a kv head count that "
        "divides the query heads.")


def check_int_vector(name: str, x, layout: str, meaning: str,
                     size: int | None = None) -> None:
  """`x` must be a 1-D integer array (of `size` entries if given).

  Args:
    name: the argument's name in the message.
    x: the argument.
    layout: its shape in words, e.g. "[num_groups]".
    meaning: what an entry counts, e.g. "rows per group".
    size: the length it must have, or None for any.
  """
  if getattr(x, "ndim", None) != 1 or (size is not None
                                       and x.shape[0] != size):
    raise ValueError(
        f"{name} must be a 1-D int32 array {layout}, got "
        f"{getattr(x, 'shape', type(x))}.")
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise ValueError(
        f"{name} must be int32 ({meaning}), got dtype {x.dtype}.")
