"""Which kernel variant runs, and whether it runs in the Pallas interpreter.

Every public kernel entry point takes `interpret=None` and `platform=None`
and hands them to `dispatch`, so all kernels pick their lowering by one
rule. Under jit the operands are tracers and the machine that will run the
code is only known when it is lowered (an ahead-of-time compile for TPU can
be traced on a CPU host), so the choice is staged out with
`jax.lax.platform_dependent` and made per lowering platform. The Triton
module is imported here once because it is optional: a jax without it still
runs every 'tpu' variant.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np

try:  # The Pallas Triton backend is deprecated but still ships.
  from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover - depends on the installed jax
  plgpu = None

PLATFORMS = ("gpu", "tpu")
# Platforms with a Pallas compiler; everywhere else only the interpreter runs.
_COMPILED = ("gpu", "cuda", "rocm", "tpu")
# Lowering platforms that get their own branch.
_TARGETS = ("tpu", "cuda", "rocm", "cpu")


def _device_platform(*arrays) -> str | None:
  """Platform of the first concrete array; None when there is none."""
  for x in arrays:
    try:
      devices = x.devices()
    except Exception:  # Tracers and numpy arrays have no committed device.
      continue
    return next(iter(devices)).platform
  return None


def check(interpret: Any, platform: str | None) -> None:
  """Raises ValueError naming `interpret` or `platform` when malformed."""
  if not (interpret is None or isinstance(interpret, (bool, np.bool_))
          or "Interpret" in type(interpret).__name__):
    raise ValueError(
        f"interpret must be None, a bool or a pallas InterpretParams, got "
        f"{interpret!r}.")
  if platform is not None and platform not in PLATFORMS:
    raise ValueError(
        f"platform must be None, 'gpu' or 'tpu', got {platform!r}.")


def pick(interpret: Any, platform: str | None, target: str | None
         ) -> tuple[Any, str]:
  """(interpret, platform) with no None left, for lowering on `target`.

  None interpret means the interpreter where there is no Pallas compiler
  (CPU) and a compiled kernel on GPU/TPU. None platform means the Mosaic
  variant on TPU and the Triton variant elsewhere: the CPU interpreter runs
  the GPU body because its masked loads exercise every edge case. A numpy
  bool becomes a bool so that it hashes like one as a static argument.
  """
  if interpret is None:
    interpret = target not in _COMPILED
  elif isinstance(interpret, np.bool_):
    interpret = bool(interpret)
  if platform is None:
    platform = "tpu" if target == "tpu" else "gpu"
  return interpret, platform


def dispatch(kernel: Callable[..., Any], operands: Sequence[Any], *,
             interpret: Any, platform: str | None, anchors: Sequence[Any],
             refused: dict[str, str] | None = None) -> Any:
  """kernel(*operands, interpret=..., platform=...) for where it will run.

  Args:
    kernel: traced once per distinct (interpret, platform); every variant
      must return the same shapes and dtypes.
    operands: the arrays (pytrees allowed) passed to `kernel`.
    interpret: None, a bool, or a pallas InterpretParams (e.g.
      pltpu.InterpretParams() for the TPU-semantics interpreter).
    platform: None, 'gpu' (Triton lowering) or 'tpu' (Mosaic lowering).
      'tpu' with interpret=True runs the Mosaic-shaped variant in the
      generic interpreter.
    anchors: the operands whose device decides: the first concrete one
      fixes the choice now; when all are tracers it is left to lowering.
    refused: variant -> ValueError message, for variants the caller's
      static options rule out (e.g. block sizes only one of them accepts).
      A platform that would run a refused variant gets no branch, so
      lowering for it fails (jax's NotImplementedError naming the platform)
      while the others lower as usual. A stand-in branch that raised the
      message at lowering would not do: under grad a branch whose output is
      not needed is pruned, and its gradient would silently be zero.

  Returns:
    The kernel's result.

  Raises:
    ValueError: naming `interpret` or `platform` when it is malformed.
  """
  check(interpret, platform)
  refused = dict(refused or {})
  if plgpu is None:  # Tracing the Triton variant would fail even for TPU.
    refused.setdefault("gpu", "This jax has no Pallas Triton backend "
                       "(jax.experimental.pallas.triton); pass platform='tpu' "
                       "to use the Mosaic variant.")
  device = _device_platform(*anchors)
  if device is not None or (interpret is not None and platform is not None):
    i, p = pick(interpret, platform, device)
    if p in refused:
      raise ValueError(refused[p])
    return kernel(*operands, interpret=i, platform=p)
  choices = {t: pick(interpret, platform, t) for t in _TARGETS}
  if all(p in refused for _, p in choices.values()):
    raise ValueError(next(iter(refused.values())))
  # One callable per distinct choice: platform_dependent merges branches
  # that are the same object, so each variant is traced once.
  by_choice: dict[tuple[Any, str], Callable[..., Any]] = {}
  branches: dict[str, Callable[..., Any]] = {}
  for target, (i, p) in choices.items():
    if p in refused:
      continue
    if (i, p) not in by_choice:
      by_choice[(i, p)] = (lambda i, p: lambda *a: kernel(
          *a, interpret=i, platform=p))(i, p)
    branches[target] = by_choice[(i, p)]
  # Other platforms run CPU's choice, unless something was refused: then the
  # default could put the interpreter where a refused variant belonged.
  default = branches["cpu"] if len(branches) == len(_TARGETS) else None
  return jax.lax.platform_dependent(*operands, default=default, **branches)


def require_triton() -> None:
  """Raises RuntimeError where this jax has no Pallas Triton backend."""
  if plgpu is None:
    raise RuntimeError(
        "This jax has no Pallas Triton backend (jax.experimental.pallas."
        "triton); pass platform='tpu' to use the Mosaic variant.")
