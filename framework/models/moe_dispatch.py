"""Moving tokens to their experts and back, and the expert SwiGLU matmuls: the two dispatch paths of an MoE layer.

`expert_ffn` runs per shard under shard_map (a sort and a grouped matmul are opaque to GSPMD's partitioner, and a
token exchange is clearer written out). Inside, each device holds its own tokens and its slice of the expert
weights; weights split over 'embed' (fsdp) are gathered, the 'mlp' (tensor) split stays and the partial outputs
are summed over it.

- dropless: the device's (token, choice) pairs are sorted by expert and go through a grouped matmul (one weight per
  contiguous group of rows): `pallas_kernels.grouped_matmul`, `jax.lax.ragged_dot`, or 'blocked' (each expert's
  rows padded to whole blocks, then one batched matmul over the blocks with each block's expert weight; XLA:CPU
  lowers ragged_dot as every expert on every row, num_experts times the work). An 'expert' mesh axis splits the
  expert weights like fsdp does (gathered for use, gradients reduce-scattered): no token leaves its device.
- capacity: each sequence gives every expert `capacity` slots, first come first served in (choice, position)
  order (all first choices before any second choice); choices past the capacity are dropped (their weight is
  lost, the residual stream carries the token). The slot buffers are exchanged over the 'expert' mesh axis with
  an all-to-all, so each device computes only its own experts, for every device's tokens.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from framework.mesh import Sharder, rule_axes

WEIGHT_NAMES = {'wi_gate': ('expert', 'embed', 'mlp'), 'wi_up': ('expert', 'embed', 'mlp'),
                'wo': ('expert', 'mlp', 'embed')}


def capacity_positions(idx: jax.Array, num_experts: int) -> jax.Array:
  """[b, s, k] expert choices -> each choice's slot index within its expert in its sequence.

  Slots are handed out in (choice rank, position) order, so a token's first choice outranks every second choice.
  """
  b, s, k = idx.shape
  one_hot = jax.nn.one_hot(idx.transpose(0, 2, 1).reshape(b, k * s), num_experts, dtype=jnp.int32)
  before = jnp.cumsum(one_hot, axis=1) - one_hot  # choices of the same expert earlier in the order
  pos = jnp.sum(before * one_hot, axis=-1)  # [b, k*s]
  return pos.reshape(b, k, s).transpose(0, 2, 1)


def expert_ffn(x, idx, gates, weights: dict, *, moe, sharder: Sharder, platform: str, capacity: int = 0,
               positions=None):
  """Routed SwiGLU experts: y[t] = sum_j gates[t, j] * FFN_{idx[t, j]}(x[t]).

  x [b, s, d]; idx, gates [b, s, k]; weights {'wi_gate', 'wi_up': [E, d, f], 'wo': [E, f, d]}. capacity > 0 selects
  the capacity path (choices at or past their expert's capacity are dropped); `positions`: capacity_positions(idx)
  when the caller has them already. Returns y [b, s, d] in x's dtype.
  """
  if not capacity:
    pos = jnp.zeros_like(idx)
  else:
    pos = capacity_positions(idx, moe.num_experts) if positions is None else positions
  local = functools.partial(_local_ffn, moe=moe, capacity=capacity, platform=platform)
  if sharder.mesh is None:
    return local(x, idx, gates, pos, weights, axes=_Axes((), (), ()))
  token_spec = sharder.spec(('batch', 'seq', None))
  w_specs = {k: sharder.spec(v) for k, v in WEIGHT_NAMES.items()}
  names = lambda i: rule_axes(w_specs['wi_gate'][i])
  axes = _Axes(expert=names(0), embed=names(1), mlp=names(2))
  # check_vma=False: a pallas_call's outputs carry no manual-axis type. The collectives' transposes (gather ->
  # reduce-scatter, psum over 'mlp' shards) are checked by the tests, which compare every gradient on expert-,
  # fsdp- and tensor-parallel meshes with one device's (tests/test_moe.py).
  fn = jax.shard_map(functools.partial(local, axes=axes), mesh=sharder.mesh,
                     in_specs=(token_spec, token_spec, token_spec, token_spec, w_specs), out_specs=token_spec,
                     check_vma=False)
  return fn(x, idx, gates, pos, weights)


class _Axes:
  """Mesh axes that split the expert weights' expert, embed and mlp dims (empty tuples off a mesh)."""

  def __init__(self, expert, embed, mlp):
    self.expert, self.embed, self.mlp = tuple(expert), tuple(embed), tuple(mlp)


def _gather(w, axes, axis):
  return jax.lax.all_gather(w, axes, axis=axis, tiled=True) if axes else w


def _local_ffn(x, idx, gates, pos, weights, *, axes: _Axes, moe, capacity, platform):
  wg = _gather(weights['wi_gate'], axes.embed, 1)
  wu = _gather(weights['wi_up'], axes.embed, 1)
  wo = _gather(weights['wo'], axes.embed, 2)
  if capacity:
    y = _capacity(x, idx, gates, pos, (wg, wu, wo), moe.num_experts, capacity, axes.expert)
  else:
    wg, wu, wo = (_gather(w, axes.expert, 0) for w in (wg, wu, wo))
    y = _dropless(x, idx, gates, (wg, wu, wo), moe, platform)
  # Each 'mlp' shard holds part of every expert's hidden units: its output is a partial sum.
  return jax.lax.psum(y, axes.mlp) if axes.mlp else y


def _swiglu(gmm, xs, wg, wu, wo):
  return gmm(jax.nn.silu(gmm(xs, wg)) * gmm(xs, wu), wo)


def _dropless(x, idx, gates, ws, moe, platform):
  b, s, d = x.shape
  k = idx.shape[-1]
  flat = idx.reshape(-1)
  order = jnp.argsort(flat, stable=True)  # (token, choice) pairs grouped by expert
  sizes = jnp.bincount(flat, length=moe.num_experts).astype(jnp.int32)
  xs = x.reshape(b * s, d)[order // k]
  impl = resolve_gmm_impl(moe.gmm_impl, platform)
  if impl == 'blocked':
    ys = _blocked_swiglu(xs, flat[order], sizes, ws, moe.gmm_block_rows)
  else:
    ys = _swiglu(functools.partial(_grouped_matmul, sizes=sizes, impl=impl), xs, *ws)
  unsorted = jnp.zeros_like(order).at[order].set(jnp.arange(order.size, dtype=order.dtype))
  y = ys[unsorted].reshape(b, s, k, d)
  return jnp.einsum('bskd,bsk->bsd', y, gates.astype(y.dtype))


def resolve_gmm_impl(impl: str, platform: str) -> str:
  """'auto': the Pallas kernel where it compiles (GPU, TPU), the blocked XLA matmul on CPU."""
  if impl != 'auto':
    return impl
  return 'blocked' if platform == 'cpu' else 'pallas'


def _grouped_matmul(xs, w, *, sizes, impl):
  if impl == 'ragged_dot':
    return jax.lax.ragged_dot(xs, w, sizes)
  import pallas_kernels  # pylint: disable=g-import-not-at-top  (kernels load only when asked for)
  return pallas_kernels.grouped_matmul(xs, w, sizes)


def _blocked_swiglu(xs, experts_sorted, sizes, ws, block_rows):
  """Grouped SwiGLU with each expert's rows padded to whole blocks of `block_rows`: one batched matmul per
  projection over the blocks, each block times its expert's weight. Padding adds < num_experts blocks."""
  rows, d = xs.shape
  e = sizes.shape[0]
  tm = block_rows
  padded = -(-sizes // tm) * tm
  padded_start = jnp.cumsum(padded) - padded
  start = jnp.cumsum(sizes) - sizes
  rank = jnp.arange(rows, dtype=jnp.int32) - start[experts_sorted]
  dest = padded_start[experts_sorted] + rank  # row r's place in the padded layout
  n_blocks = -(-(rows + e * (tm - 1)) // tm)
  block_expert = jnp.minimum(jnp.searchsorted(jnp.cumsum(padded), jnp.arange(n_blocks) * tm, side='right'), e - 1)
  source = jnp.full((n_blocks * tm,), rows, jnp.int32).at[dest].set(jnp.arange(rows, dtype=jnp.int32))
  xp = jnp.concatenate([xs, jnp.zeros((1, d), xs.dtype)])[source].reshape(n_blocks, tm, d)

  def gmm(a, w):
    return jnp.einsum('nmk,nkf->nmf', a, w[block_expert])

  yp = _swiglu(gmm, xp, *ws).reshape(n_blocks * tm, -1)
  return yp[dest]


def _capacity(x, idx, gates, pos, ws, num_experts, capacity, expert_axes):
  b, s, d = x.shape
  k = idx.shape[-1]
  keep = pos < capacity
  dump = num_experts * capacity
  slot = jnp.where(keep, idx * capacity + pos, dump)  # [b, s, k]
  rows = jnp.broadcast_to(jnp.arange(b)[:, None, None], slot.shape)
  tokens = jnp.broadcast_to(x[:, :, None, :], (b, s, k, d))
  buf = jnp.zeros((b, dump + 1, d), x.dtype).at[rows, slot].add(tokens)[:, :dump]
  buf = buf.reshape(b, num_experts, capacity, d)
  if expert_axes:  # [b, E, C, d] -> [n * b, E / n, C, d]: every peer's slots for this device's experts
    buf = jax.lax.all_to_all(buf, expert_axes, 1, 0, tiled=True)
  gmm = lambda a, w: jnp.einsum('becd,edf->becf', a, w)
  out = _swiglu(gmm, buf, *ws)
  if expert_axes:
    out = jax.lax.all_to_all(out, expert_axes, 0, 1, tiled=True)
  out = jnp.concatenate([out.reshape(b, dump, d), jnp.zeros((b, 1, d), out.dtype)], axis=1)
  y = out[rows, slot]  # [b, s, k, d]; dropped choices read the zero row
  return jnp.einsum('bskd,bsk->bsd', y, (gates * keep).astype(y.dtype))
