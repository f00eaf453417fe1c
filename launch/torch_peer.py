"""A plain PyTorch twin of batchax's dense decoder and AdamW train step: the peer `launch.bench --peer=torch` times.

Written from the config alone, sharing no code with framework/, so that tests/test_torch_peer.py comparing the two
is a check of both. Eager f32, SDPA attention, stock torch.optim.AdamW: what a researcher would write by hand.
The layout is PyTorch's own (nn.Linear weights [out, in], one module per layer); `load_batchax_params` maps
batchax's stacked flax tree onto it.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

BATCH_KEYS = ('inputs', 'targets', 'segment_ids', 'positions', 'weights')


def head_dim(m) -> int:
  return m.head_dim or m.d_model // m.n_heads  # the config's 0 means d_model / n_heads


class RMSNorm(nn.Module):

  def __init__(self, d: int, eps: float):
    super().__init__()
    self.eps = eps
    self.scale = nn.Parameter(torch.ones(d))

  def forward(self, x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.scale


def rope_tables(positions: torch.Tensor, dim: int, theta: float):
  """cos, sin [b, s, 1, dim / 2] for the half-split rotation (first half pairs with second half)."""
  half = dim // 2
  freqs = theta ** (-torch.arange(half, dtype=torch.float32) / half)
  angles = positions.float()[..., None, None] * freqs
  return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
  x1, x2 = x.chunk(2, dim=-1)
  return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Block(nn.Module):

  def __init__(self, m):
    super().__init__()
    self.n_heads, self.n_kv_heads, self.head_dim = m.n_heads, m.n_kv_heads, head_dim(m)
    d = m.d_model
    self.attn_norm = RMSNorm(d, m.norm_eps)
    self.wq = nn.Linear(d, m.n_heads * self.head_dim, bias=False)
    self.wk = nn.Linear(d, m.n_kv_heads * self.head_dim, bias=False)
    self.wv = nn.Linear(d, m.n_kv_heads * self.head_dim, bias=False)
    self.wo = nn.Linear(m.n_heads * self.head_dim, d, bias=False)
    self.mlp_norm = RMSNorm(d, m.norm_eps)
    self.wi_gate = nn.Linear(d, m.d_ff, bias=False)
    self.wi_up = nn.Linear(d, m.d_ff, bias=False)
    self.w_out = nn.Linear(m.d_ff, d, bias=False)

  def forward(self, x, cos, sin, mask):
    b, s, _ = x.shape
    h = self.attn_norm(x)
    q = apply_rope(self.wq(h).view(b, s, self.n_heads, self.head_dim), cos, sin)
    k = apply_rope(self.wk(h).view(b, s, self.n_kv_heads, self.head_dim), cos, sin)
    v = self.wv(h).view(b, s, self.n_kv_heads, self.head_dim)
    # enable_gqa repeats each kv head over consecutive query heads, batchax's grouping (query head j reads kv
    # head j // (n_heads / n_kv_heads)).
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                         enable_gqa=self.n_heads != self.n_kv_heads)
    x = x + self.wo(out.transpose(1, 2).reshape(b, s, -1))
    h = self.mlp_norm(x)
    return x + self.w_out(F.silu(self.wi_gate(h)) * self.wi_up(h))


class Decoder(nn.Module):
  """tokens, positions, segment_ids [b, s] int -> logits [b, s, vocab] f32."""

  def __init__(self, m):
    super().__init__()
    self.head_dim, self.rope_theta, self.tie = head_dim(m), m.rope_theta, m.tie_embeddings
    self.embedding = nn.Embedding(m.vocab_size, m.d_model)
    self.layers = nn.ModuleList(Block(m) for _ in range(m.n_layers))
    self.final_norm = RMSNorm(m.d_model, m.norm_eps)
    self.head = None if m.tie_embeddings else nn.Linear(m.d_model, m.vocab_size, bias=False)

  def forward(self, tokens, positions, segment_ids):
    s = tokens.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    # [b, 1, s, s]: a token sees earlier tokens of its own packed document only. Every row sees at least itself,
    # so no row of the mask is empty (SDPA would give NaN there).
    mask = (causal & (segment_ids[:, :, None] == segment_ids[:, None, :]))[:, None]
    cos, sin = rope_tables(positions, self.head_dim, self.rope_theta)
    x = self.embedding(tokens)
    for layer in self.layers:
      x = layer(x, cos, sin, mask)
    x = self.final_norm(x)
    return x @ self.embedding.weight.T if self.tie else self.head(x)


def loss_terms(logits, targets, weights, z_loss: float):
  """(the loss to differentiate, mean CE): CE and z_loss * logsumexp^2 summed over weighted tokens, divided by
  their count, as batchax's step takes them."""
  log_z = torch.logsumexp(logits, dim=-1)
  ce = log_z - logits.gather(-1, targets[..., None])[..., 0]
  tokens = weights.sum().clamp(min=1.0)
  ce_mean = (ce * weights).sum() / tokens
  return ce_mean + z_loss * (log_z.square() * weights).sum() / tokens, ce_mean


def lr_at(o, total_steps: int, step: int) -> float:
  """optim.schedule's learning rate for update `step` (0-based): linear warmup from 0, then cosine to
  lr * min_lr_ratio, warmup-stable-decay (linear over the last decay_fraction of the steps), or constant."""
  peak, floor, warmup = o.lr, o.lr * o.min_lr_ratio, o.warmup_steps
  if step < warmup:
    return peak * step / warmup
  if o.schedule == 'constant':
    return peak
  if o.schedule == 'cosine':
    span = max(total_steps, warmup + 1) - warmup
    frac = min(step - warmup, span) / span
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * frac))
  decay_steps = max(1, round(o.decay_fraction * total_steps))
  stable_end = max(warmup, total_steps - decay_steps)
  if step < stable_end:
    return peak
  return peak + (floor - peak) * min(step - stable_end, decay_steps) / decay_steps


class Peer:
  """The model, AdamW and the step counter of one run; `step(batch)` is one optimizer update."""

  def __init__(self, model_cfg, optim_cfg, total_steps: int, z_loss: float, seed: int = 0):
    if optim_cfg.name != 'adamw':
      raise ValueError(f'the torch peer implements optim.name adamw only, got {optim_cfg.name!r}')
    if (model_cfg.dtype, model_cfg.param_dtype) != ('float32', 'float32'):
      raise ValueError(f'the torch peer runs in float32 only, got model.dtype {model_cfg.dtype!r} and '
                       f'model.param_dtype {model_cfg.param_dtype!r}')
    torch.manual_seed(seed)
    self.model = Decoder(model_cfg)
    self.optim_cfg, self.total_steps, self.z_loss = optim_cfg, total_steps, z_loss
    self.updates = 0
    # No decay on norm scales, as batchax's decay_mask; every weight matrix (embedding and head too) decays.
    decay = [p for n, p in self.model.named_parameters() if not n.endswith('.scale')]
    no_decay = [p for n, p in self.model.named_parameters() if n.endswith('.scale')]
    o = optim_cfg
    self.optimizer = torch.optim.AdamW(
        [{'params': decay, 'weight_decay': o.weight_decay}, {'params': no_decay, 'weight_decay': 0.0}],
        lr=lr_at(o, total_steps, 0), betas=(o.b1, o.b2), eps=o.eps)

  def step(self, batch: dict) -> float:
    """One update on a batch of torch tensors (see `to_torch`); returns the mean CE before it."""
    lr = lr_at(self.optim_cfg, self.total_steps, self.updates)
    for group in self.optimizer.param_groups:
      group['lr'] = lr
    logits = self.model(batch['inputs'], batch['positions'], batch['segment_ids'])
    loss, ce = loss_terms(logits, batch['targets'], batch['weights'], self.z_loss)
    self.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if self.optim_cfg.grad_clip:
      torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.optim_cfg.grad_clip)
    self.optimizer.step()
    self.updates += 1
    return ce.detach()


def to_torch(batch: dict) -> dict:
  """A host batch of numpy (or jax) arrays -> torch tensors, token ids as int64 (what gather and embedding take)."""
  out = {}
  for k in BATCH_KEYS:
    a = np.asarray(batch[k])
    out[k] = torch.from_numpy(a.astype(np.float32 if k == 'weights' else np.int64))
  return out


# --- batchax parameters <-> this layout ----------------------------------------------------------------------


def param_mapping(params) -> dict[str, np.ndarray]:
  """batchax's flax params (layers stacked on axis 0, heads as their own axis, [in, out] matrices) -> this
  model's state_dict ([out, in] matrices, heads folded into the feature axis), as numpy arrays."""
  p = jax_tree_to_numpy(params)
  layers = p['layers']
  out = {'embedding.weight': p['embedding'], 'final_norm.scale': p['final_norm']['scale']}
  if 'head' in p:
    out['head.weight'] = p['head'].T
  for i in range(layers['attn']['wq'].shape[0]):
    a, m = {k: v[i] for k, v in layers['attn'].items()}, {k: v[i] for k, v in layers['mlp'].items()}
    d = a['wq'].shape[0]
    out.update({
        f'layers.{i}.attn_norm.scale': layers['attn_norm']['scale'][i],
        f'layers.{i}.mlp_norm.scale': layers['mlp_norm']['scale'][i],
        f'layers.{i}.wq.weight': a['wq'].reshape(d, -1).T,  # [d, h, k] -> [h * k, d]
        f'layers.{i}.wk.weight': a['wk'].reshape(d, -1).T,
        f'layers.{i}.wv.weight': a['wv'].reshape(d, -1).T,
        f'layers.{i}.wo.weight': a['wo'].reshape(-1, d).T,  # [h, k, d] -> [d, h * k]
        f'layers.{i}.wi_gate.weight': m['wi_gate'].T,
        f'layers.{i}.wi_up.weight': m['wi_up'].T,
        f'layers.{i}.w_out.weight': m['wo'].T,
    })
  return out


def jax_tree_to_numpy(tree):
  if isinstance(tree, dict) or hasattr(tree, 'items'):
    return {k: jax_tree_to_numpy(v) for k, v in tree.items()}
  return np.asarray(tree, dtype=np.float32)


def load_batchax_params(peer: Peer, params) -> None:
  """Copies batchax's parameters into the peer (before its first step: AdamW's moments stay empty)."""
  mapped = param_mapping(params)
  own = peer.model.state_dict()
  if set(mapped) != set(own):
    raise ValueError(f'parameter names differ: only batchax {sorted(set(mapped) - set(own))}, '
                     f'only torch {sorted(set(own) - set(mapped))}')
  peer.model.load_state_dict({k: torch.tensor(v) for k, v in mapped.items()})
