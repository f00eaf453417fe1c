"""gcp-storage-emulator with the object generations and preconditions of the real GCS JSON API, which
TensorStore's gcs driver (Orbax's arrays) relies on: a media download names its generation in
x-goog-generation, and ifGenerationMatch / ifGenerationNotMatch are honoured (412 / 304) on reads, uploads and
deletes. The emulator ignores both, so OCDBT's conditional manifest writes fail against it ("Malformed
StorageGeneration").

  python tests/gcs_emulator.py PORT BUCKET     (in memory; serves until killed)
"""
import logging
import sys
from http import HTTPStatus

from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_download, _insert, _delete = objects.download, objects.insert, objects.delete


def _generation(storage, bucket: str, name: str) -> str:
  try:
    return storage.get_file_obj(bucket, name)['generation']
  except NotFound:
    return '0'  # GCS's ifGenerationMatch=0: "only if the object does not exist"


def _refused(request, response, storage, name) -> bool:
  """Answers 412 / 304 (and returns True) when the request's preconditions fail."""
  current = _generation(storage, request.params['bucket_name'], name)
  match, not_match = request.query.get('ifGenerationMatch'), request.query.get('ifGenerationNotMatch')
  if match and match[0] != current:
    response.status = HTTPStatus.PRECONDITION_FAILED
    response.json({'error': {'code': 412, 'message': 'At least one of the pre-conditions you specified did not hold.'}})
    return True
  if not_match and not_match[0] == current:
    response.status = HTTPStatus.NOT_MODIFIED
    return True
  return False


def download(request, response, storage, *args, **kwargs):
  name = request.params['object_id']
  if _refused(request, response, storage, name):
    return
  _download(request, response, storage, *args, **kwargs)
  if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
    obj = storage.get_file_obj(request.params['bucket_name'], name)
    response['x-goog-generation'] = obj['generation']
    response['x-goog-metageneration'] = obj['metageneration']


def insert(request, response, storage, *args, **kwargs):
  name = request.query.get('name', [None])[0]
  if name is None and isinstance(request.data, dict):
    name = request.data.get('meta', {}).get('name')
  if name is not None and _refused(request, response, storage, name):
    return
  _insert(request, response, storage, *args, **kwargs)


def delete(request, response, storage, *args, **kwargs):
  if _refused(request, response, storage, request.params['object_id']):
    return
  _delete(request, response, storage, *args, **kwargs)


# objects.get (?alt=media) calls the module's download, so it takes this one too.
objects.download, objects.insert, objects.delete = download, insert, delete

if __name__ == '__main__':
  from gcp_storage_emulator.server import create_server  # after the patch: its routes take these handlers
  logging.basicConfig(level=logging.ERROR)
  port, bucket = int(sys.argv[1]), sys.argv[2]
  create_server('127.0.0.1', port, in_memory=True, default_bucket=bucket).run()
