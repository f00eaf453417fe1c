"""Per-device memory of a compiled step against the chip's HBM, and the verdict on whether it fits."""
from __future__ import annotations

import dataclasses

GIB = 1024 ** 3
# HBM per chip (one jax device; a v5p/v4 megacore chip is one device), by jax's device_kind.
HBM_BYTES = {
    'TPU v5 lite': 16 * GIB,   # v5e
    'TPU v5': 95 * GIB,        # v5p
    'TPU v5p': 95 * GIB,
    'TPU v4': 32 * GIB,
    'TPU v6 lite': 32 * GIB,   # v6e (Trillium)
}


@dataclasses.dataclass(frozen=True)
class MemoryReport:
  arguments: int
  outputs: int
  aliased: int     # outputs that reuse a donated argument's buffer: counted once
  temporaries: int
  code: int
  hbm: int

  @property
  def total(self) -> int:
    return self.arguments + self.outputs - self.aliased + self.temporaries + self.code

  @property
  def fits(self) -> bool:
    return self.total <= self.hbm


def hbm_bytes(device_kind: str) -> int:
  if device_kind not in HBM_BYTES:
    raise ValueError(f'no HBM size known for device kind {device_kind!r}; known: {sorted(HBM_BYTES)} '
                     '(add it to launch/memory_report.py HBM_BYTES)')
  return HBM_BYTES[device_kind]


def from_compiled(compiled, device_kind: str) -> MemoryReport:
  m = compiled.memory_analysis()
  return MemoryReport(arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes,
                      aliased=m.alias_size_in_bytes, temporaries=m.temp_size_in_bytes,
                      code=m.generated_code_size_in_bytes, hbm=hbm_bytes(device_kind))


def _gib(n: int) -> str:
  return f'{n / GIB:8.3f} GiB'


def format_table(r: MemoryReport) -> str:
  rows = [('arguments', r.arguments), ('outputs', r.outputs), ('aliased (donated)', -r.aliased),
          ('temporaries', r.temporaries), ('generated code', r.code), ('total', r.total), ('HBM', r.hbm)]
  lines = [f'  {name:<18}{_gib(n)}' for name, n in rows]
  lines[-2] += f'  ({100 * r.total / r.hbm:.1f}% of HBM)'
  return '\n'.join(lines)


class DoesNotFit(Exception):
  """The step needs more HBM per device than the chip has."""


FIXES = ('shard more with FSDP (--config.mesh.fsdp=-1 --config.mesh.data=1, or a bigger --topology), '
         'rematerialize (--config.model.remat_policy=full), or cut the micro-batch '
         '(raise --config.train.micro_batches or lower --config.train.batch_size)')


def refusal(r: MemoryReport, where: str) -> str:
  """One line: how far over, and the knobs that bring it down."""
  return (f'the train step needs {r.total / GIB:.2f} GiB per device but {where} has {r.hbm / GIB:.0f} GiB of HBM; '
          f'{FIXES}')


def compiler_refusal(xla_message: str, where: str) -> str:
  """One line from XLA's out-of-memory error (it refuses to compile what cannot fit), with the same fixes."""
  first = xla_message.strip().splitlines()[0] if xla_message.strip() else 'out of memory'
  reason = first.removeprefix('RESOURCE_EXHAUSTED: ').rstrip('.')
  return f'the train step does not fit on {where}: XLA: {reason}; {FIXES}'
