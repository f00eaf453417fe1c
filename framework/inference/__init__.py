"""Batched inference: a paged KV cache, chunked prefill and decode steps over fixed slots, continuous batching
with a token budget, shared-prefix (Hydragen) decoding, sampling, and the Llama-format import/export."""
