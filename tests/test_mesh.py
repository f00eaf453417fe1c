"""Mesh construction from cfg.mesh: -1 fill, DCN (multi-slice) layout, and the errors for sizes that do not fit."""
import jax
import numpy as np
import pytest

from framework import config
from framework import mesh as mesh_lib


def _mesh_cfg(**sizes):
  cfg = config.defaults()
  cfg.mesh.update(**sizes)
  return cfg.mesh


def test_fill_axis_takes_the_remaining_devices():
  m = mesh_lib.make_mesh(_mesh_cfg(data=-1, fsdp=2, tensor=2))
  assert dict(m.shape) == {'data': 2, 'fsdp': 2, 'expert': 1, 'tensor': 2}
  assert sorted(d.id for d in m.devices.flat) == list(range(8))


def test_dcn_axis_is_outermost_so_slices_stay_contiguous():
  # 2 "slices" of 4 devices: data = 2 (dcn) x 2 (ici); each slice's devices must stay within one DCN half.
  m = mesh_lib.make_mesh(_mesh_cfg(data=-1, fsdp=2, dcn_data=2))
  assert dict(m.shape) == {'data': 4, 'fsdp': 2, 'expert': 1, 'tensor': 1}
  ids = np.vectorize(lambda d: d.id)(m.devices)[:, :, 0, 0]
  assert set(ids[:2].flat) == {0, 1, 2, 3} and set(ids[2:].flat) == {4, 5, 6, 7}


def test_mesh_on_a_subset_of_devices():
  m = mesh_lib.make_mesh(_mesh_cfg(data=1, fsdp=-1), devices=jax.devices()[:4])
  assert m.shape['fsdp'] == 4 and m.devices.size == 4


@pytest.mark.parametrize('sizes, field', [
    (dict(data=3), 'config mesh:'),
    (dict(data=-1, fsdp=-1), 'mesh.fsdp'),
    (dict(data=-1, fsdp=3), 'mesh.data'),
    (dict(data=0), 'mesh.data'),
    (dict(dcn_data=3), 'mesh.dcn_*'),
])
def test_sizes_that_do_not_fit_are_refused(sizes, field):
  with pytest.raises(ValueError, match=field.replace('*', r'\*')):
    mesh_lib.make_mesh(_mesh_cfg(**sizes))
