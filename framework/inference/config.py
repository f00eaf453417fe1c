"""The `inference` config section: the engine's slots, KV pages, per-step token budget and prefix sharing.

Shapes that the jitted steps compile for are fixed here (slots, prefill rows x chunk), so a step compiles once
per KV width bucket (framework/inference/forward.py), whatever requests arrive.
"""
from __future__ import annotations

import ml_collections

from framework.config_checks import Context, fail, non_negative, one_of, positive

SCHEDULINGS = ('continuous', 'static')
ATTENTION_IMPLS = ('auto', 'xla', 'pallas')


def defaults() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      slots=8,                   # sequences decoded together; a finished one frees its slot for the next request
      page_size=16,              # tokens per KV page
      kv_pages=0,                # pages in the KV pool (page 0 is scratch); 0: every slot at model.max_seq_len
      prefill_rows=2,            # prompts that advance their prefill in one step
      prefill_chunk=64,          # prompt tokens per prefill row per step (Sarathi-Serve's chunk)
      token_budget=0,            # tokens per step: running decodes first, then prefill chunks; 0: all rows full
      prefix_sharing=True,       # reuse the KV pages of a common prompt prefix; decode it with shared-prefix attention
      prefix_groups=2,           # shared prefixes read once per decode step (Hydragen); 0: plain paged attention
      group_offline_batch=True,  # generate(): order the batch by shared prefix, then longest output first (BatchLLM)
      scheduling='continuous',   # continuous | static (a new batch only when the whole last one has finished)
      attention_impl='auto',     # auto (pallas on GPU/TPU, xla on CPU) | xla | pallas
      max_tokens=128,            # default output cap per request (a request's max_tokens may lower or raise it)
      max_tokens_limit=0,        # hard cap on any request's output; 0: only the context length caps it
      speculative_tokens=4,      # with a draft model: tokens it proposes per sequence per round (speculative.py)
  ))


def validate(cfg, ctx: Context) -> None:
  i = cfg.inference
  positive(i, 'inference', 'slots', 'page_size', 'prefill_rows', 'prefill_chunk', 'max_tokens',
           'speculative_tokens')
  non_negative(i, 'inference', 'kv_pages', 'token_budget', 'prefix_groups', 'max_tokens_limit')
  one_of('inference.scheduling', i.scheduling, SCHEDULINGS)
  one_of('inference.attention_impl', i.attention_impl, ATTENTION_IMPLS)
  if i.kv_pages and i.kv_pages < 2:
    fail('inference.kv_pages', f'{i.kv_pages} leaves no page for sequences (page 0 is scratch); use >= 2 or 0')
  if i.token_budget and i.token_budget < i.slots + 1:
    fail('inference.token_budget', f'{i.token_budget} cannot hold a decode token for each of the {i.slots} slots '
         'plus one prompt token; raise it or set 0 (every row full)')
  del ctx


def max_pages_per_sequence(cfg) -> int:
  return -(-cfg.model.max_seq_len // cfg.inference.page_size)


def kv_pages(cfg) -> int:
  """Pages in the pool, scratch page included."""
  return cfg.inference.kv_pages or cfg.inference.slots * max_pages_per_sequence(cfg) + 1


def token_budget(cfg) -> int:
  i = cfg.inference
  return i.token_budget or i.slots + i.prefill_rows * i.prefill_chunk
