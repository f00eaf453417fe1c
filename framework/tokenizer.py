"""Byte-level tokenizer: needs no vocabulary file, so it works on every machine.

Ids 0..2 are the specials (PAD, BOS, EOS); byte b is id b + 3, so the vocabulary
is 259 ids. Every byte string round-trips exactly, and any str round-trips
through its UTF-8 bytes.
"""
from typing import Iterable

import numpy as np


class ByteTokenizer:
  """Maps text to UTF-8 bytes shifted past the special ids, and back."""

  PAD_ID = 0
  BOS_ID = 1
  EOS_ID = 2
  NUM_SPECIAL = 3
  vocab_size = 256 + NUM_SPECIAL

  def encode(self, text: str, add_bos: bool = True,
             add_eos: bool = True) -> np.ndarray:
    """Encodes `text` as int32 ids: [BOS] utf-8 bytes + 3 [EOS]."""
    return self.encode_bytes(text.encode("utf-8"), add_bos, add_eos)

  def encode_bytes(self, data: bytes, add_bos: bool = True,
                   add_eos: bool = True, dtype=np.int32) -> np.ndarray:
    """Encodes raw bytes (no decoding, so any file is accepted) as ids."""
    body = np.frombuffer(data, dtype=np.uint8)
    out = np.empty(body.size + int(add_bos) + int(add_eos), dtype=dtype)
    start = int(add_bos)
    if add_bos:
      out[0] = self.BOS_ID
    if add_eos:
      out[-1] = self.EOS_ID
    out[start:start + body.size] = body
    out[start:start + body.size] += self.NUM_SPECIAL
    return out

  def decode(self, ids: Iterable[int] | np.ndarray) -> str:
    """Decodes ids to text, skipping specials and ids outside the vocabulary.

    Out-of-range ids are skipped rather than refused because models often pad
    their output layer past `vocab_size` and may sample those ids.
    """
    arr = np.asarray(ids, dtype=np.int64).reshape(-1)
    keep = (arr >= self.NUM_SPECIAL) & (arr < self.vocab_size)
    data = (arr[keep] - self.NUM_SPECIAL).astype(np.uint8).tobytes()
    return data.decode("utf-8", errors="replace")
