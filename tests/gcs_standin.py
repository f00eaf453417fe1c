"""A local stand-in for Google Cloud Storage: gcp-storage-emulator (the GCS JSON API over HTTP, in memory, with the
generations and preconditions tests/gcs_emulator.py adds) on a free port, with the environment that points every client of a gs:// workdir at it: gcsfs (epath's fsspec
backend: metrics, TensorBoard, checkpoint listing and markers) and TensorStore's gcs driver (Orbax's arrays).
Everything above the HTTP layer is the code that runs against a real bucket, including Orbax's gs:// commit
protocol (a marker file, no rename)."""
import contextlib
import os
import subprocess
import sys
import time
import urllib.request

from ports import free_port

BUCKET = 'bucket'


def client_env(url: str) -> dict:
  """The variables that send gcsfs and TensorStore to `url` without credentials."""
  return {
      'STORAGE_EMULATOR_HOST': url,          # gcsfs (and google-cloud-storage)
      'TENSORSTORE_GCS_HTTP_URL': url,       # TensorStore's gcs kvstore
      'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'x',  # TensorStore: a fixed bearer token, no metadata-server lookup
      'FSSPEC_GCS_TOKEN': 'anon',            # gcsfs: no credential search
      # gcsfs asks the gRPC Storage Control API whether a bucket is zonal; the emulator speaks only the JSON API,
      # and each question would wait 60 s before gcsfs falls back to the plain JSON-API client used here.
      'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',
  }


@contextlib.contextmanager
def fake_gcs(log_path):
  """Runs the emulator with bucket BUCKET; yields the client environment (a dict) while it is up."""
  port = free_port()
  url = f'http://127.0.0.1:{port}'
  with open(log_path, 'w', encoding='utf-8') as log:
    server = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(__file__), 'gcs_emulator.py'), str(port),
                               BUCKET], stdout=log, stderr=log)
    try:
      deadline = time.monotonic() + 30
      while True:
        try:
          with urllib.request.urlopen(f'{url}/storage/v1/b/{BUCKET}', timeout=2):
            break
        except OSError:
          if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f'the GCS emulator did not start; see {log_path}') from None
          time.sleep(0.2)
      yield client_env(url)
    finally:
      server.kill()
      server.wait()


def objects(env: dict, prefix: str) -> dict[str, int]:
  """name -> size of the objects under gs://BUCKET/prefix, read with the JSON API directly (not through the
  code under test)."""
  import json  # pylint: disable=g-import-not-at-top
  import urllib.parse  # pylint: disable=g-import-not-at-top
  found, token = {}, ''
  while True:
    query = urllib.parse.urlencode({'prefix': prefix, **({'pageToken': token} if token else {})})
    with urllib.request.urlopen(f"{env['STORAGE_EMULATOR_HOST']}/storage/v1/b/{BUCKET}/o?{query}") as r:
      page = json.load(r)
    found.update({item['name']: int(item['size']) for item in page.get('items', [])})
    token = page.get('nextPageToken')
    if not token:
      return found


def read(env: dict, name: str) -> bytes:
  import urllib.parse  # pylint: disable=g-import-not-at-top
  quoted = urllib.parse.quote(name, safe='')
  with urllib.request.urlopen(f"{env['STORAGE_EMULATOR_HOST']}/download/storage/v1/b/{BUCKET}/o/{quoted}?alt=media") as r:
    return r.read()


def upload(env: dict, name: str, data: bytes) -> None:
  import urllib.parse  # pylint: disable=g-import-not-at-top
  query = urllib.parse.urlencode({'uploadType': 'media', 'name': name})
  request = urllib.request.Request(f"{env['STORAGE_EMULATOR_HOST']}/upload/storage/v1/b/{BUCKET}/o?{query}",
                                   data=data, method='POST', headers={'Content-Type': 'application/octet-stream'})
  with urllib.request.urlopen(request):
    pass


def env_with(env: dict) -> dict:
  """os.environ plus `env`, for a subprocess."""
  return {**os.environ, **env}
