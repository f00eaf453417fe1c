"""Ahead-of-time compile for a TPU slice on this CPU host through libtpu (slow: ~2 minutes on 2 CPU cores).

The Pallas kernels go through the real Mosaic compiler here, which no other test does: the lowering tests stop
at Mosaic IR.
"""
import math

import jax
import numpy as np
import pytest

from launch import aot

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not aot.libtpu_installed(),
                                 reason="libtpu is not installed (pip install -e '.[tpu]'); nothing compiles for TPU")]


def _shard_bytes(tree) -> int:
  """Bytes one device holds of arrays with shardings: the shard shape, from the sharding, not from XLA."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def test_lm_tiny_with_pallas_attention_compiles_for_v5e():
  from configs import lm_tiny
  from framework import mesh as mesh_lib
  from framework import train
  cfg = lm_tiny.get_config()
  cfg.model.attention_impl = 'pallas'
  devices = aot.topology_devices('v5e:2x2')
  assert [d.device_kind for d in devices] == ['TPU v5 lite'] * 4
  step = aot.compile_train_step(cfg, devices)
  hlo = step.hlo_text()
  assert 'tpu_custom_call' in hlo  # the Mosaic kernels, compiled, not the interpreter's loops
  assert 'flash_attention_fwd_tpu' in hlo and 'flash_attention_bwd_dq_tpu' in hlo

  mem = step.memory
  assert mem.hbm == 16 * 1024 ** 3
  assert 0 < mem.total < mem.hbm and mem.arguments > 0 and mem.outputs > 0
  # The state is donated: the new state reuses its buffers.
  assert mem.aliased > 0
  # Independent of XLA's accounting: what the shardings put on one device. TPU tiled layouts may pad small
  # arrays, so XLA's figure can exceed the logical one, but not by much at these sizes.
  trainer = train.Trainer(cfg, mesh_lib.make_sharder(cfg, devices))
  logical = _shard_bytes(trainer.abstract_state) + cfg.train.batch_size // 4 * cfg.data.seq_len * 4 * 5
  assert logical <= mem.arguments <= 1.5 * logical
  assert step.flops_per_device > 0


def test_bad_topology_names_examples():
  with pytest.raises(ValueError, match=r"--topology='v5e:3x3'.*use e\.g\. v5e:2x2"):
    aot.topology_devices('v5e:3x3')


def test_moe_tiny_with_the_pallas_grouped_matmul_compiles_for_an_expert_parallel_v5e():
  from configs import moe_tiny
  cfg = moe_tiny.get_config()
  cfg.model.attention_impl = 'pallas'
  cfg.moe.gmm_impl = 'auto'  # the Pallas grouped matmul on TPU
  cfg.mesh.update(data=2, expert=2)
  step = aot.compile_train_step(cfg, aot.topology_devices('v5e:2x2'))
  hlo = step.hlo_text()
  assert 'tpu_custom_call' in hlo
  assert 'grouped_matmul_tpu' in hlo and 'transposed_grouped_matmul_tpu' in hlo  # forward and weight gradient
  assert 0 < step.memory.total < step.memory.hbm
