"""What the study launchers (launch.moe_balance, launch.sweep, launch.adaptive_batch) share: reading the config
file a study starts from, and writing its tables, JSON summary and the command that made them."""
from __future__ import annotations

import importlib.util
import json
import os
import shlex
import sys


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


def subplots(*args, **kwargs):
  """(figure, axes) as pyplot.subplots gives, on a Figure of its own: no pyplot state and no backend switch, so a
  study run from a notebook leaves the notebook's inline plots alone. Save with fig.savefig(path)."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top  (the [study] extra)
  fig = Figure(figsize=kwargs.pop('figsize', None))
  return fig, fig.subplots(*args, **kwargs)


def run_main(argv, module: str, study, *args, out: str) -> None:
  """A study launcher's main(): set up the runtime, run `study(*args, command=...)` (one line on stderr for a user
  error, not a traceback) and print the summary it wrote."""
  from absl import app  # pylint: disable=g-import-not-at-top
  from launch import runtime_flags  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  runtime_flags.exit_on_user_error(runtime_flags.apply)
  command = f'python -m {module} ' + ' '.join(shlex.quote(a) for a in sys.argv[1:])
  runtime_flags.exit_on_user_error(study, *args, command=command)
  with open(os.path.join(out, 'summary.md'), encoding='utf-8') as f:
    print(f.read())
