"""Executes a notebook under colabs/ the way Colab would, top to bottom in a fresh Jupyter kernel (nbclient),
with the small settings the notebooks read from BATCHAX_NOTEBOOK_* environment variables.

Each notebook asserts the facts it teaches in its own cells (so a notebook that runs but shows the wrong thing
fails) and prints one `BATCHAX_NOTEBOOK_RESULT {json}` line of its key figures, which its test checks against
files or formulas of its own. Every PNG the notebook displays is written to build/notebook_plots/ so the plots
can be looked at after a test run.
"""
import base64
import json
import os
import pathlib

REPO = pathlib.Path(__file__).resolve().parent.parent
COLABS = REPO / 'colabs'
PLOTS = REPO / 'build' / 'notebook_plots'
RESULT_TAG = 'BATCHAX_NOTEBOOK_RESULT '


def run_notebook(name: str, timeout: int = 600, **env) -> dict:
  """Runs colabs/<name>; returns its BATCHAX_NOTEBOOK_RESULT. `env`: BATCHAX_NOTEBOOK_<KEY> variables."""
  import nbclient  # pylint: disable=g-import-not-at-top  (the `test` extra)
  import nbformat  # pylint: disable=g-import-not-at-top
  path = COLABS / name
  nb = nbformat.read(path, as_version=4)
  saved = dict(os.environ)
  # A fresh kernel process: jax there must start without the test session's 8 fake devices.
  os.environ.pop('XLA_FLAGS', None)
  os.environ['JAX_PLATFORMS'] = 'cpu'
  os.environ['BATCHAX_NOTEBOOK_TEST'] = '1'
  os.environ.update({f'BATCHAX_NOTEBOOK_{k.upper()}': str(v) for k, v in env.items()})
  try:
    client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name='python3', resources={'metadata': {
        'path': str(REPO)}})
    client.execute()
  finally:
    os.environ.clear()
    os.environ.update(saved)
  stem = path.stem
  PLOTS.mkdir(parents=True, exist_ok=True)
  for old in PLOTS.glob(f'{stem}_*.png'):
    old.unlink()
  results, count = [], 0
  for cell in nb.cells:
    for output in cell.get('outputs', []):
      data = output.get('data', {})
      if 'image/png' in data:
        count += 1
        (PLOTS / f'{stem}_{count}.png').write_bytes(base64.b64decode(data['image/png']))
      text = output.get('text', '') if output.get('output_type') == 'stream' else ''
      results += [line[len(RESULT_TAG):] for line in text.splitlines() if line.startswith(RESULT_TAG)]
  assert len(results) == 1, f'{name}: expected one {RESULT_TAG.strip()} line, got {len(results)}'
  result = json.loads(results[0])
  result['_plots'] = count
  return result
