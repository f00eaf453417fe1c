"""Which kernel variant runs, and whether it runs in the Pallas interpreter.

Every public kernel entry point takes `interpret=None` and `platform=None`
and fills them in with `resolve`, so all kernels pick their lowering by one
rule. The Triton module is imported here once because it is optional: a jax
without it still runs every 'tpu' variant.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np

try:  # The Pallas Triton backend is deprecated but still ships.
  from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover - depends on the installed jax
  plgpu = None

PLATFORMS = ("gpu", "tpu")
# Platforms with a Pallas compiler; everywhere else only the interpreter runs.
_COMPILED = ("gpu", "cuda", "rocm", "tpu")


def _device_platform(*arrays) -> str:
  """Platform of the first concrete array; the default backend otherwise."""
  for x in arrays:
    try:
      devices = x.devices()
    except Exception:  # Tracers and numpy arrays have no committed device.
      continue
    return next(iter(devices)).platform
  return jax.default_backend()


def resolve(interpret: Any, platform: str | None, *arrays
            ) -> tuple[Any, str]:
  """Fills in a kernel's `interpret` and `platform` arguments.

  None interpret means the interpreter where there is no Pallas compiler
  (CPU) and a compiled kernel on GPU/TPU. None platform means the Mosaic
  variant on TPU and the Triton variant elsewhere: the CPU interpreter runs
  the GPU body because its masked loads exercise every edge case.
  `platform='tpu'` with interpret=True runs the Mosaic-shaped variant in the
  generic interpreter.

  Args:
    interpret: None, a bool, or a pallas InterpretParams (e.g.
      pltpu.InterpretParams() for the TPU-semantics interpreter).
    platform: None, 'gpu' (Triton lowering) or 'tpu' (Mosaic lowering).
    *arrays: the kernel's operands; the device of the first concrete one
      decides the defaults (under jit they are tracers and the default
      backend decides).

  Returns:
    (interpret, platform) with no None left; a numpy bool becomes a bool so
    that it hashes like one as a static argument.

  Raises:
    ValueError: naming `interpret` or `platform` when it is malformed.
  """
  if not (interpret is None or isinstance(interpret, (bool, np.bool_))
          or "Interpret" in type(interpret).__name__):
    raise ValueError(
        f"interpret must be None, a bool or a pallas InterpretParams, got "
        f"{interpret!r}.")
  if platform is not None and platform not in PLATFORMS:
    raise ValueError(
        f"platform must be None, 'gpu' or 'tpu', got {platform!r}.")
  device = _device_platform(*arrays)
  if interpret is None:
    interpret = device not in _COMPILED
  elif isinstance(interpret, np.bool_):
    interpret = bool(interpret)
  if platform is None:
    platform = "tpu" if device == "tpu" else "gpu"
  return interpret, platform


def require_triton() -> None:
  """Raises RuntimeError where this jax has no Pallas Triton backend."""
  if plgpu is None:
    raise RuntimeError(
        "This jax has no Pallas Triton backend (jax.experimental.pallas."
        "triton); pass platform='tpu' to use the Mosaic variant.")
