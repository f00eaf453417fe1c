"""Workdir paths, local or remote (gs://, s3://, az://): one etils.epath.Path API for checkpoints, metrics and
TensorBoard.

Remote paths go through epath's fsspec backend (gcsfs, s3fs, adlfs: `pip install batchax[gcs]` for gs://) and,
for the arrays, through Orbax and TensorStore's own drivers; a local path is the same Path class over os.
An object in a bucket can be neither appended to nor renamed atomically, so an appending file (metrics.jsonl,
TensorBoard events) is uploaded whole at each flush there, and a rewrite is one upload instead of tmp + rename.
"""
from __future__ import annotations

import os

from etils import epath

REMOTE_SCHEMES = ('gs', 's3', 'az')


def is_remote(path) -> bool:
  return '://' in os.fspath(path)


def workdir_path(path) -> epath.Path:
  """`path` as an epath.Path; a local one made absolute, so logs and Orbax name the same directory."""
  if is_remote(path):
    scheme = os.fspath(path).split('://', 1)[0]
    if scheme not in REMOTE_SCHEMES:
      raise ValueError(f'{os.fspath(path)!r}: {scheme}:// is not a supported storage scheme; use a local path or '
                       f'one of {", ".join(s + "://" for s in REMOTE_SCHEMES)}')
    return epath.Path(path)
  return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def write_bytes_atomic(path: epath.Path, data: bytes) -> None:
  """Replaces `path`'s content so a crash leaves the old or the new one, never a part: an object upload is
  atomic by itself; a local file is written beside and renamed over."""
  if is_remote(path):
    path.write_bytes(data)
    return
  tmp = path.with_name(path.name + '.tmp')
  tmp.write_bytes(data)
  tmp.replace(path)


def move_tree(src: epath.Path, dst: epath.Path) -> None:
  """Moves the directory `src` to `dst` (which must not exist). In a bucket, where a directory is only a name
  prefix, this copies each object and then deletes it."""
  if not is_remote(src):
    src.rename(dst)
    return
  # Through epath alone (not a second fsspec instance), so the listing cache Orbax reads through is updated.
  for item in list(_files(src)):
    item.copy(dst / item.relative_to(src))
  src.rmtree()


def _files(root: epath.Path):
  for item in root.iterdir():
    if item.is_dir():
      yield from _files(item)
    else:
      yield item


class AppendFile:
  """A binary file opened for appending. Locally: append and flush. Remote: the content is kept and uploaded
  whole at each flush (the object is replaced in one piece, so a reader never sees a torn write)."""

  def __init__(self, path: epath.Path):
    self.path = path
    self._remote = is_remote(path)
    if self._remote:
      self._content = bytearray(path.read_bytes() if path.exists() else b'')
      self._dirty = False
    else:
      self._file = open(path, 'ab')  # pylint: disable=consider-using-with

  def write(self, data: bytes) -> None:
    if self._remote:
      self._content += data
      self._dirty = True
    else:
      self._file.write(data)

  def flush(self) -> None:
    if not self._remote:
      self._file.flush()
    elif self._dirty:
      self.path.write_bytes(bytes(self._content))
      self._dirty = False

  def close(self) -> None:
    self.flush()
    if not self._remote:
      self._file.close()


class _TensorBoardFactory:
  """tensorboardX's writer factory for remote event files, through AppendFile (so through epath)."""

  def open(self, path: str) -> AppendFile:
    return AppendFile(epath.Path(path))

  def directory_check(self, path: str) -> None:
    del path  # a bucket has no directories to create


def tensorboard_writer(logdir: epath.Path):
  """A tensorboardX SummaryWriter writing under `logdir`, local or remote."""
  from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top
  if is_remote(logdir):
    # Replaces tensorboardX's own gs:// writer (google-cloud-storage) and adds s3:// / az://, so every remote
    # file of a run takes the one path that workdir_path checked.
    for scheme in REMOTE_SCHEMES:
      record_writer.register_writer_factory(scheme, _TensorBoardFactory())
  return SummaryWriter(os.fspath(logdir))


def check_writable(root: epath.Path, process_index: int) -> None:
  """Writes and deletes one small object under the remote `root`: a missing backend, bucket or permission fails
  here, in one line, instead of at the first checkpoint."""
  probe = root / f'.batchax-write-check-{process_index}'
  try:
    probe.write_bytes(b'')
    probe.unlink()
  except ImportError as e:
    raise ValueError(f'--workdir {os.fspath(root)!r} needs the {e.name or "fsspec backend"} package: pip install '
                     "'batchax[gcs]' (gs://), s3fs (s3://) or adlfs (az://)") from None
  except Exception as e:  # pylint: disable=broad-except  (each backend raises its own types)
    raise ValueError(f'--workdir {os.fspath(root)!r}: cannot write there ({type(e).__name__}: {e}); check the bucket '
                     'name and your credentials') from None
