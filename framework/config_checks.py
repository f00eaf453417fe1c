"""The small vocabulary every config section's `validate` speaks: one ValueError naming the field and the fix.

Each feature keeps its section's defaults and checks beside its code (models/config.py, corpus.py, train.py,
optim.py, mesh.py, checkpoint.py, metrics.py); `framework.config` composes them. This module holds only what
they share, so it imports nothing of the framework.
"""
from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Context:
  """What a section's checks may depend on besides the config: the devices it runs on and the resolved mesh.

  sizes: mesh axis -> size (ICI x DCN, -1 already filled); rules: the config's logical axis rules.
  """
  num_devices: int
  backend: str
  sizes: dict
  rules: tuple


def fail(field: str, message: str):
  raise ValueError(f'config {field}: {message}')


def one_of(field: str, value: Any, allowed: tuple) -> None:
  if value not in allowed:
    fail(field, f'{value!r} is not one of {allowed}')


def positive(section_cfg, section: str, *names: str) -> None:
  for name in names:
    if section_cfg[name] <= 0:
      fail(f'{section}.{name}', f'must be > 0, got {section_cfg[name]}')


def non_negative(section_cfg, section: str, *names: str) -> None:
  for name in names:
    if section_cfg[name] < 0:
      fail(f'{section}.{name}', f'must be >= 0, got {section_cfg[name]}')
