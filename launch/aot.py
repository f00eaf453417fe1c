"""Ahead-of-time lowering and compiling of the train step for a TPU slice this host does not have.

libtpu describes a topology's devices without the chips being present (jax.experimental.topologies), and
compiles for them; everything here works on a CPU-only host. Kept apart from the CLI so tests call it directly.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os

# Another jax process on this host (tests, a benchmark) may already hold libtpu's lockfile; a topology-only
# client never touches a chip, so sharing libtpu is safe here.
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
# Off a TPU VM libtpu cannot look up its workers and logs a multi-line error per lookup; this host is the only one.
os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

from launch import memory_report  # pylint: disable=g-import-not-at-top

TOPOLOGY_EXAMPLES = 'v5e:2x2, v5e:2x4, v5p:2x2x1, v4:2x2x1, v6e:2x2'
_BATCH_DTYPES = {'inputs': jnp.int32, 'targets': jnp.int32, 'segment_ids': jnp.int32, 'positions': jnp.int32,
                 'weights': jnp.float32}


def libtpu_installed() -> bool:
  return importlib.util.find_spec('libtpu') is not None


def topology_devices(name: str) -> list:
  """The devices of TPU topology `name` (e.g. 'v5e:2x4'); ValueError naming valid examples otherwise."""
  if not libtpu_installed():
    raise ValueError("compiling for TPU needs libtpu: pip install -e '.[tpu]'")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    topo = topologies.get_topology_desc(platform='tpu', topology_name=name)
  except Exception as e:  # libtpu raises JaxRuntimeError with a paragraph; keep its first line only.
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ValueError(f'--topology={name!r} is not a TPU topology libtpu can build ({reason}); use e.g. '
                     f'{TOPOLOGY_EXAMPLES}') from None
  return list(topo.devices)


@dataclasses.dataclass
class CompiledStep:
  compiled: object
  memory: memory_report.MemoryReport
  flops_per_device: float     # XLA's cost analysis of one device's program: loop bodies once, Pallas as 0
  model_flops: float          # the model's own count, 6 N + attention, for the whole global batch
  attention_impl: str
  mesh_sizes: dict

  def hlo_text(self) -> str:
    return self.compiled.as_text()


def compile_train_step(cfg, devices) -> CompiledStep:
  """Validates cfg for these TPU devices, builds the mesh and Trainer, and compiles the train step."""
  from framework import config as config_lib  # pylint: disable=g-import-not-at-top
  from framework import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from framework import train  # pylint: disable=g-import-not-at-top
  from framework.models import attention  # pylint: disable=g-import-not-at-top

  # 'auto' is resolved from the default backend at trace time, which is this host's CPU; fix it to what it
  # means on the target so the compile is of the program the TPU would run.
  m = cfg.model
  impl = attention.resolve_impl(m.attention_impl, jnp.dtype(m.dtype), m.head_dim, backend='tpu')
  with cfg.unlocked():
    cfg.model.attention_impl = impl
  sizes = config_lib.validate(cfg, num_devices=len(devices), backend='tpu')
  trainer = train.Trainer(cfg, mesh_lib.make_sharder(cfg, devices))
  shape = (cfg.train.batch_size, cfg.data.seq_len)
  batch = {k: jax.ShapeDtypeStruct(shape, _BATCH_DTYPES.get(k, jnp.int32), sharding=s)
           for k, s in trainer.batch_sharding.items()}
  lowered = trainer.train_step.lower(trainer.abstract_state, batch)
  kind = devices[0].device_kind
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    # The TPU compiler refuses a program whose buffers exceed HBM; that is the answer, not a crash.
    if 'RESOURCE_EXHAUSTED' not in str(e):
      raise
    raise memory_report.DoesNotFit(memory_report.compiler_refusal(str(e), f'{len(devices)} x {kind}')) from None
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  model_flops = trainer.flops_per_token * shape[0] * shape[1]
  return CompiledStep(compiled=compiled, memory=memory_report.from_compiled(compiled, kind),
                      flops_per_device=float(cost.get('flops', 0.0)), model_flops=model_flops,
                      attention_impl=impl, mesh_sizes=dict(sizes))
