"""Every notebook under colabs/ runs top to bottom (a short run of it) in a fresh process."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

COLABS = sorted((pathlib.Path(__file__).parent.parent / 'colabs').glob('*.ipynb'))


def _code(path: pathlib.Path) -> str:
  cells = json.loads(path.read_text())['cells']
  lines = []
  for cell in cells:
    if cell['cell_type'] == 'code':
      # Shell and magic lines (installs) are for Colab; the test environment already has the package.
      lines += [l for l in ''.join(cell['source']).splitlines() if not l.lstrip().startswith(('!', '%'))]
  return '\n'.join(lines)


@pytest.mark.parametrize('path', COLABS, ids=[p.name for p in COLABS])
def test_notebook_runs(path, tmp_path):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env.update(JAX_PLATFORMS='cpu', BATCHAX_NOTEBOOK_STEPS='15', BATCHAX_NOTEBOOK_CORPUS_BYTES='2000000',
             BATCHAX_NOTEBOOK_WORKDIR=str(tmp_path / 'run'))
  result = subprocess.run([sys.executable, '-c', _code(path)], env=env, cwd=path.parent.parent,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'loss' in result.stdout
