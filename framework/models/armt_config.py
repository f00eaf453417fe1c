"""The `armt` config section: the associative recurrent memory transformer (framework/models/armt.py).

`armt.segment_len = 0` (the default) keeps the plain decoder. Otherwise each row of `data.seq_len` tokens is cut
into segments of `segment_len` tokens (the last padded and masked when shorter), `memory_tokens` learned memory
embeddings are appended to every segment, and every layer carries an associative memory from segment to segment.
"""
from __future__ import annotations

import dataclasses

import ml_collections

from framework.config_checks import Context, fail, one_of, positive
from framework.models.attention import resolve_impl
from framework.models.dense import STACKED_IMPLS

EXECUTORS = ('sequential', 'diagonal')
CELL_MATMULS = ('auto',) + STACKED_IMPLS


def defaults() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      segment_len=0,         # tokens per segment; 0: no ARMT (the plain decoder)
      memory_tokens=8,       # M memory embeddings appended to every segment
      d_mem=32,              # width of the memory keys and queries before the DPFP feature map (d_key = 6 d_mem)
      executor='diagonal',   # sequential (segment after segment, layer after layer) | diagonal (L+S-1 wavefronts)
      cell_matmul='auto',    # diagonal: each weight matmul over a wavefront's cells as auto | batched | ragged_dot |
                             # pallas (auto: the pallas grouped matmul on GPU/TPU, the batched matmul on CPU)
      remat=False,           # recompute each segment (sequential) or wavefront (diagonal) in the backward pass
      memory=True,           # False: no memory reads or writes (the ablation: segments only see themselves)
  ))


@dataclasses.dataclass(frozen=True)
class ARMTConfig:
  segment_len: int
  memory_tokens: int
  d_mem: int
  executor: str
  cell_matmul: str
  remat: bool
  memory: bool

  @classmethod
  def from_config(cls, cfg) -> 'ARMTConfig | None':
    a = cfg.armt
    if not a.segment_len:
      return None
    return cls(**{f.name: a[f.name] for f in dataclasses.fields(cls)})


def validate(cfg, ctx: Context) -> None:
  a = cfg.armt
  if a.segment_len < 0:
    fail('armt.segment_len', f'must be >= 0 (0: off), got {a.segment_len}')
  if not a.segment_len:
    return
  positive(a, 'armt', 'memory_tokens', 'd_mem')
  one_of('armt.executor', a.executor, EXECUTORS)
  one_of('armt.cell_matmul', a.cell_matmul, CELL_MATMULS)
  if cfg.moe.num_experts:
    fail('armt.segment_len', 'the recurrent memory model is built on the dense decoder; set moe.num_experts=0')
  if resolve_impl(cfg.model.attention_impl, backend=ctx.backend) != 'xla':
    fail('model.attention_impl', "the ARMT executors run attention over stacked (layer, segment) cells with the "
         "'xla' implementation; set model.attention_impl='xla'")
  if a.segment_len + a.memory_tokens > cfg.model.max_seq_len:
    fail('armt.segment_len', f'a segment with its memory ({a.segment_len} + {a.memory_tokens} tokens) is longer '
         f'than model.max_seq_len={cfg.model.max_seq_len}')


def structure(cfg) -> dict:
  """The fields that fix the ARMT parameters' shapes: a checkpoint restores only if these agree."""
  a = cfg.get('armt')  # absent from configs saved before ARMT existed
  if a is None or not a.segment_len:
    return {'armt (on/off)': False}
  return {'armt (on/off)': True, 'armt.memory_tokens': a.memory_tokens, 'armt.d_mem': a.d_mem}
