"""The 'domains' data source: a corpus of clearly different kinds of text, each document labelled with its domain.

It exists on every machine (no download): the standard library's Python sources and three generated kinds, each
deterministic (a fixed seed per document), so every process and every run reads the same bytes. The label follows
every token through packing, batching, sharding and resume (`PackedStream.doc_domains`, the batch's 'domains'),
so an MoE's routing can be broken down by domain (framework/models/moe.py, launch/moe_balance.py).

  python      the standard library's .py files (the 'embedded' corpus)
  arithmetic  lines of integer sums, differences and products with their results
  dna         FASTA-like records: a header and lines of bases, fixed motifs strung together with 5% mutations
  records     JSON lines of small records (ids, city names, temperatures, tag lists)
"""
from __future__ import annotations

import json
from typing import Iterator

import numpy as np

DOMAINS = ('python', 'arithmetic', 'dna', 'records')
_DOC_BYTES = 3000  # length of a generated document, about the median stdlib file's
_SEED = 20261202
_CITIES = ('Oslo', 'Lima', 'Pune', 'Kyiv', 'Quito', 'Accra', 'Hanoi', 'Perth', 'Sapporo', 'Tunis', 'Bergen', 'Cusco')
_TAGS = ('north', 'coast', 'dry', 'wet', 'old', 'new', 'high', 'low', 'port', 'hill')


def _rng(domain: int, index: int) -> np.random.Generator:
  return np.random.default_rng([_SEED, domain, index])


def _arithmetic(rng: np.random.Generator) -> bytes:
  n = _DOC_BYTES // 8  # lines average ~13 bytes: enough, cut at the byte budget below
  a = rng.integers(0, 10 ** rng.integers(1, 5, size=n))
  b = rng.integers(0, 10 ** rng.integers(1, 5, size=n))
  ops = rng.integers(3, size=n)
  values = np.where(ops == 0, a + b, np.where(ops == 1, a - b, a * b))
  lines, size = [], 0
  for x, op, y, v in zip(a.tolist(), ops.tolist(), b.tolist(), values.tolist()):
    line = f'{x} {"+-*"[op]} {y} = {v}'
    lines.append(line)
    size += len(line) + 1
    if size >= _DOC_BYTES:
      break
  return ('\n'.join(lines) + '\n').encode()


# A fixed set of motifs over ACGT: a record strings random motifs together with 5% of bases mutated.
_MOTIFS = [np.random.default_rng([_SEED, 0, i]).integers(4, size=n) for i, n in
           enumerate(np.random.default_rng(_SEED).integers(8, 25, size=32))]


def _dna(rng: np.random.Generator, index: int) -> bytes:
  picks = rng.integers(len(_MOTIFS), size=_DOC_BYTES // 8)
  bases = np.concatenate([_MOTIFS[int(i)] for i in picks])[:_DOC_BYTES]
  mutate = rng.random(bases.size) < 0.05
  bases[mutate] = rng.integers(4, size=int(mutate.sum()))
  seq = np.frombuffer(b'ACGT', np.uint8)[bases].tobytes()
  body = b'\n'.join(seq[i:i + 60] for i in range(0, len(seq), 60))
  return b'>seq_%d\n' % index + body + b'\n'


def _records(rng: np.random.Generator, index: int) -> bytes:
  n = _DOC_BYTES // 40
  cities = rng.integers(len(_CITIES), size=n)
  temps = np.round(rng.normal(12, 9, size=n), 1)
  n_tags = rng.integers(0, 4, size=n)
  tag_order = np.argsort(rng.random((n, len(_TAGS))), axis=1)
  lines, size = [], 0
  for i in range(n):
    tags = [_TAGS[t] for t in tag_order[i, :n_tags[i]].tolist()]
    line = json.dumps({'id': index * 1000 + i, 'city': _CITIES[cities[i]], 'temp': float(temps[i]), 'tags': tags})
    lines.append(line)
    size += len(line) + 1
    if size >= _DOC_BYTES:
      break
  return ('\n'.join(lines) + '\n').encode()


def documents(python_docs: Iterator[tuple[str, bytes]], max_bytes: int) -> Iterator[tuple[str, bytes, int]]:
  """(identity, bytes, domain index) of every document, about max_bytes / len(DOMAINS) bytes of each domain."""
  budget = max_bytes // len(DOMAINS)
  size = 0
  for identity, data in python_docs:
    if size >= budget:
      break
    yield f'python/{identity}', data, 0
    size += len(data)
  for domain in range(1, len(DOMAINS)):
    size, index = 0, 0
    while size < budget:
      rng = _rng(domain, index)
      data = _arithmetic(rng) if domain == 1 else _dna(rng, index) if domain == 2 else _records(rng, index)
      yield f'{DOMAINS[domain]}/{index}', data, domain
      size += len(data)
      index += 1
