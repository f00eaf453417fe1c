"""What the study launchers (launch.moe_balance, launch.sweep, launch.adaptive_batch) share: reading the config
file a study starts from, and writing its tables, JSON summary and the command that made them."""
from __future__ import annotations

import importlib.util
import json
import os


def load_config(path: str):
  """get_config() of a config file."""
  spec = importlib.util.spec_from_file_location('study_config', path)
  if spec is None or not os.path.isfile(path):
    raise ValueError(f'--study_config: no config file at {path!r}')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def write_summary(out: str, markdown_lines: list[str], summary, command: str) -> None:
  """OUT/summary.md, OUT/summary.json and OUT/command.txt (how to make them again)."""
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, 'summary.md'), 'w', encoding='utf-8') as f:
    f.write('\n'.join(markdown_lines) + '\n')
  with open(os.path.join(out, 'summary.json'), 'w', encoding='utf-8') as f:
    json.dump(summary, f, indent=1)
  with open(os.path.join(out, 'command.txt'), 'w', encoding='utf-8') as f:
    f.write(command + '\n')
