"""Next-token sampling per row: greedy, temperature, top-k, top-p, with a per-request seed.

Row r's random key is fold_in(key(seed_r), n_r), n_r the index of the token it draws within its request, so a
request's samples depend on its own seed and its own history only: not on the batch it shares a step with, the
slot it runs in, or whether it was preempted and recomputed.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """temperature 0 is greedy (argmax); top_k 0 and top_p 1 switch those filters off."""
  max_tokens: int
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0
  stop: tuple[str, ...] = ()
  logprobs: bool = False
  ignore_eos: bool = False

  def check(self, vocab_size: int) -> None:
    """Raises ValueError naming the field, as the OpenAI API spells it."""
    def bad(field, why):
      raise ValueError(f'{field}: {why}')
    if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
      bad('max_tokens', f'must be an integer >= 1, got {self.max_tokens!r}')
    if not _number(self.temperature) or not 0 <= self.temperature <= 100:
      bad('temperature', f'must be a number in [0, 100] (0: greedy), got {self.temperature!r}')
    if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or not 0 <= self.top_k <= vocab_size:
      bad('top_k', f'must be an integer in [0, {vocab_size}] (0: off), got {self.top_k!r}')
    if not _number(self.top_p) or not 0 < self.top_p <= 1:
      bad('top_p', f'must be a number in (0, 1] (1: off), got {self.top_p!r}')
    if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
      bad('seed', f'must be an integer in [0, 2**32), got {self.seed!r}')
    if not all(isinstance(s, str) and s for s in self.stop):
      bad('stop', f'must be a non-empty string or a list of them, got {list(self.stop)!r}')


def _number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def sample(logits, temperature, top_k, top_p, seeds, counters):
  """logits [N, V] f32; per row temperature, top_p f32, top_k int32, seeds uint32, counters int32 [N].

  Returns (tokens int32 [N], logprobs f32 [N]): the log-probability of each chosen token under the model's own
  distribution (before temperature and filtering), as the OpenAI API reports it. A step whose rows are all
  greedy skips the draw (each row's token is the same either way).
  """
  logprobs_all = jax.nn.log_softmax(logits, axis=-1)
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def drawn():
    filtered = filtered_logprobs(logits, temperature, top_k, top_p)
    keys = jax.vmap(lambda seed, counter: jax.random.fold_in(jax.random.key(seed), counter))(seeds, counters)
    return jnp.where(temperature > 0, jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32), greedy)

  tokens = jax.lax.cond(jnp.any(temperature > 0), drawn, lambda: greedy)
  return tokens, jnp.take_along_axis(logprobs_all, tokens[:, None], axis=-1)[:, 0]


def filtered_logprobs(logits, temperature, top_k, top_p):
  """The distribution a row samples from, as log-probabilities [N, V] in vocabulary order (-inf: filtered out):
  softmax(logits / temperature) over the top_k most likely tokens, then the smallest set of them whose mass
  reaches top_p (the most likely token always stays). Temperature 0: all mass on the argmax (greedy).

  Only a row with a filter on (top_k in (0, V), top_p < 1) takes the sorted form, and the vocabulary is sorted
  only in a step that has such a row: the sort is most of the sampling's cost. A row's result depends on its
  own parameters only, whatever else the step holds."""
  vocab = logits.shape[-1]
  scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
  plain = jax.nn.log_softmax(scaled, axis=-1)
  filters = (temperature > 0) & (((top_k > 0) & (top_k < vocab)) | (top_p < 1))
  ranked = jax.lax.cond(jnp.any(filters), lambda: jax.vmap(_filtered)(scaled, top_k, top_p), lambda: plain)
  sampled = jnp.where(filters[:, None], ranked, plain)
  greedy = jnp.where(jnp.arange(vocab)[None] == jnp.argmax(logits, axis=-1)[:, None], 0.0, -jnp.inf)
  return jnp.where(temperature[:, None] > 0, sampled, greedy.astype(sampled.dtype))


def _filtered(scaled, top_k, top_p):
  vocab = scaled.shape[-1]
  order = jnp.argsort(-scaled)
  ranked = scaled[order]
  keep = jnp.arange(vocab) < jnp.where(top_k > 0, top_k, vocab)
  probs = jax.nn.softmax(jnp.where(keep, ranked, -jnp.inf))
  before = jnp.cumsum(probs) - probs
  keep &= before < top_p
  ranked_lp = jax.nn.log_softmax(jnp.where(keep, ranked, -jnp.inf))
  return jnp.full((vocab,), -jnp.inf, ranked_lp.dtype).at[order].set(ranked_lp)
