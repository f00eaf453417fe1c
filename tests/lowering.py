"""Lowers jitted functions for platforms this host lacks, so the Pallas GPU (Triton) and TPU (Mosaic) lowering
rules run in CPU-only CI."""
import jax


def lower_for(target: str, fn, *args) -> str:
  """StableHLO text of `fn(*args)` lowered for 'cuda' or 'tpu'."""
  if target == 'cuda':
    return jax.jit(fn).trace(*args).lower(lowering_platforms=('cuda',)).as_text()
  device = jax.sharding.AbstractDevice(device_kind='TPU v5 lite', num_cores=1, platform='tpu')
  mesh = jax.sharding.AbstractMesh((1,), ('x',), abstract_device=device)
  with jax.sharding.use_abstract_mesh(mesh):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=('tpu',)).as_text()
