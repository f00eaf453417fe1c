"""The pure train step `train_step(state, batch) -> (state, metrics)` and everything it is jitted with.

`Trainer` builds the model and optimizer from a config, derives every array's sharding from logical axis names,
and jits init / train / eval steps with explicit in and out shardings.
"""
from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import NamedSharding, PartitionSpec

from framework import corpus, optim
from framework.config_checks import Context, fail, non_negative, positive
from framework.mesh import Sharder, mesh_sizes, shard_count, spread_over
from framework.models import moe_balance
from framework.models.layers import ModelConfig
from framework.models import armt as armt_lib
from framework.models.armt import ARMT
from framework.models.armt_config import ARMTConfig
from framework.models.moe_config import MoEConfig
from framework.models.transformer import Transformer, flops_per_token

BATCH_KEYS = ('inputs', 'targets', 'segment_ids', 'positions', 'weights')


# --- the `train` config section --------------------------------------------------------------------------------


def defaults() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      steps=200,
      batch_size=16,         # global, in sequences
      micro_batches=1,       # gradient accumulation
      device_batch=0,        # > 0: rows per device per micro-batch; sets micro_batches from the device count
      z_loss=1e-4,
      log_every=10,
      eval_every=100,        # 0: never
      eval_batches=4,
      micro_grad_norms=False,  # log each micro-batch's gradient norm
      target_eval_loss=0.0,  # stop (saving a checkpoint) at the first evaluation at or below this; 0: off
  ))


def validate(cfg, ctx: Context) -> None:
  t = cfg.train
  positive(t, 'train', 'steps', 'batch_size', 'micro_batches', 'log_every', 'eval_batches')
  non_negative(t, 'train', 'eval_every', 'z_loss', 'target_eval_loss', 'device_batch')
  if t.target_eval_loss and not t.eval_every:
    fail('train.target_eval_loss', 'is checked at evaluations: set train.eval_every > 0')
  dp, dp_axes = shard_count(ctx.rules, ctx.sizes, 'batch')
  if t.device_batch:
    rows = dp * t.device_batch
    if t.batch_size % rows:
      fail('train.device_batch', f'{t.device_batch} rows on each of the {dp} batch shards ({" x ".join(dp_axes) or "1"}) '
           f'make {rows}-row micro-batches, which do not divide train.batch_size ({t.batch_size}); choose a '
           f'device_batch with {dp} x device_batch dividing {t.batch_size}')
    if t.micro_batches != t.batch_size // rows:
      fail('train.micro_batches', f'is {t.micro_batches}, but train.device_batch={t.device_batch} sets it to '
           f'{t.batch_size // rows} on this mesh; set only one of the two')
  unit = dp * t.micro_batches
  if t.batch_size % unit:
    fail('train.batch_size', f'{t.batch_size} is not divisible by the batch shards ({" x ".join(dp_axes) or "1"} '
         f'= {dp}) x train.micro_batches ({t.micro_batches}) = {unit}; use a multiple of {unit}')


def resolve_micro_batches(cfg, num_devices: int) -> tuple[Any, str | None]:
  """With train.device_batch > 0: a copy of `cfg` whose train.micro_batches gives every batch shard that many
  rows per micro-batch on `num_devices` devices (train.batch_size / (batch shards x device_batch)), and a line
  saying so. The count then follows the devices: a run resumed on fewer of them accumulates more micro-batches
  of the same size, so the same global batch fits the same memory. Otherwise (cfg, None)."""
  t = cfg.train
  if not t.device_batch or t.micro_batches != 1:  # unset, or set by hand (validate() checks the two agree)
    return cfg, None
  sizes = mesh_sizes(cfg.mesh, num_devices)
  dp, dp_axes = shard_count(tuple(cfg.mesh.axis_rules), sizes, 'batch')
  if t.batch_size % (dp * t.device_batch):
    return cfg, None  # validate() names the fields
  resolved = cfg.copy_and_resolve_references()
  resolved.train.micro_batches = t.batch_size // (dp * t.device_batch)
  return resolved, (f'train.micro_batches = {resolved.train.micro_batches}: train.batch_size {t.batch_size} / '
                    f'({dp} batch shards ({" x ".join(dp_axes) or "1"}) x train.device_batch {t.device_batch})')


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # completed optimizer steps
  params: Any
  opt_state: Any


def token_losses(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> dict[str, jax.Array]:
  """Sums (not means) of cross-entropy and z-loss terms, so micro-batches add up to the full batch exactly."""
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return {
      'ce_sum': jnp.sum((log_z - target_logit) * weights),
      'z_sum': jnp.sum(jnp.square(log_z) * weights),
      'tokens': jnp.sum(weights),
  }


def split_micro_batches(x: jax.Array, n: int) -> jax.Array:
  """[B, ...] -> [n, B/n, ...], micro-batch j = rows j, j+n, ...

  Strided rows keep every data-parallel shard's slice of each micro-batch on that shard: contiguous chunks
  would put micro-batch 0 on the first devices only.
  """
  return x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)


class Trainer:
  """Model, optimizer, shardings and the jitted steps for one config on one mesh."""

  def __init__(self, cfg, sharder: Sharder, model_cls=Transformer, lr_schedule: optax.Schedule | None = None):
    """`model_cls(model_cfg, sharder)` builds the network: a module whose call maps (tokens, positions,
    segment_ids) to (logits, aux), where aux is a dict of statistics the step sums over micro-batches and
    reports in its metrics (e.g. an MoE model's expert counts). `lr_schedule` replaces the config's schedule
    by step (a batch-size schedule's rung runs it in examples, framework/batch_schedule.py)."""
    self.cfg = cfg
    self.sharder = sharder
    batch_shards, _ = shard_count(sharder.rules, dict(sharder.mesh.shape), 'batch')
    # What a device's activation memory scales with: the rows each batch shard holds per micro-batch.
    self.device_rows = cfg.train.batch_size // (batch_shards * cfg.train.micro_batches)
    moe = MoEConfig.from_config(cfg, batch_shards, num_domains=corpus.num_domains(cfg.data))
    self.model_cfg = ModelConfig.from_config(cfg.model, moe, ARMTConfig.from_config(cfg))
    if self.model_cfg.armt is not None and model_cls is Transformer:
      model_cls = ARMT
    self.model = model_cls(self.model_cfg, sharder)
    # Parameters do not depend on how activations are laid out; initialising through a mesh-less twin keeps
    # per-shard kernels (shard_map) away from the one-row dummy batch.
    self._init_model = model_cls(self.model_cfg, Sharder(None, sharder.rules))
    self.lr_schedule = lr_schedule or optim.schedule(cfg.optim, cfg.train.steps)
    self.optimizer = optim.make_optimizer(cfg.optim, cfg.train.steps, self.lr_schedule)
    self.seq_len = cfg.data.seq_len
    self.replicated = NamedSharding(sharder.mesh, PartitionSpec())
    # Domain labels travel with the batch when the data has them (for the MoE's per-domain routing statistics).
    self.batch_keys = BATCH_KEYS + (('domains',) if corpus.num_domains(cfg.data) else ())
    self.batch_sharding = {k: sharder.sharding(('batch', 'seq')) for k in self.batch_keys}
    self.abstract_state, self.state_shardings = self._abstract_state()
    # Without gradient accumulation the noise estimate compares each batch shard's gradient with their mean: a
    # twin of the model whose activations leave the batch axes to the vmap over shards (see _per_shard_grads).
    self.noise_per_shard = cfg.noise_scale.enabled and cfg.train.micro_batches == 1
    if self.noise_per_shard:
      rules = tuple((name, None if name == 'batch' else axes) for name, axes in sharder.rules)
      self._shard_model = model_cls(self.model_cfg, Sharder(sharder.mesh, rules))

    self.init = jax.jit(self._init, out_shardings=self.state_shardings)
    self.train_step = jax.jit(self._train_step, in_shardings=(self.state_shardings, self.batch_sharding),
                              out_shardings=(self.state_shardings, self.replicated), donate_argnums=(0,))
    self.eval_step = jax.jit(self._eval_step, in_shardings=(self.state_shardings.params, self.batch_sharding),
                             out_shardings=self.replicated)

  # --- state -------------------------------------------------------------------------------------------------

  def _init_variables(self, rng):
    dummy = jnp.zeros((1, self.seq_len), jnp.int32)
    return self._init_model.init(rng, dummy, dummy, dummy)

  def _abstract_state(self):
    """Shapes and NamedShardings of the whole train state, from the parameters' logical axis names."""
    boxed = jax.eval_shape(self._init_variables, jax.random.key(0))['params']
    param_shardings = self.sharder.tree_shardings(nn.get_partition_spec(boxed))
    params = nn.meta.unbox(boxed)
    opt_state = jax.eval_shape(self.optimizer.init, params)
    # Optimizer moments mirror the parameters (further split over the data-parallel axes, see
    # optim.shard_state_over_data); counters and other scalars are replicated.
    _, dp_axes = shard_count(self.sharder.rules, dict(self.sharder.mesh.shape), 'batch')
    spread = dp_axes if self.cfg.optim.shard_state_over_data else ()
    opt_shardings = optax.tree_map_params(
        self.optimizer, lambda moment, s: spread_over(s, moment.shape, spread), opt_state, param_shardings,
        transform_non_params=lambda _: self.replicated)
    shardings = TrainState(step=self.replicated, params=param_shardings, opt_state=opt_shardings)
    abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params, opt_state=opt_state)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return abstract, shardings

  def _init(self, rng) -> TrainState:
    params = nn.meta.unbox(self._init_variables(rng)['params'])
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.optimizer.init(params))

  # --- steps -------------------------------------------------------------------------------------------------

  def _apply(self, params, batch, balance=None, model=None):
    """The model on one (micro-)batch; an MoE model also gets the step's balance inputs and the domain labels."""
    extras = {}
    if self.model_cfg.moe is not None:
      extras = {'balance': balance, 'domains': batch.get('domains')}
    return (model or self.model).apply({'params': params}, batch['inputs'], batch['positions'],
                                       batch['segment_ids'], **extras)

  def _micro_loss(self, params, batch, balance, loss_scale, model=None):
    """The micro-batch's summed loss. A model's aux_loss is mean-normalised (its sum over the step's micro-batches
    is the step's mean), so it is scaled by the step's token count like the summed terms are divided by it."""
    logits, aux = self._apply(params, batch, balance, model)
    stats = {**token_losses(logits, batch['targets'], batch['weights']), **aux}
    loss = stats['ce_sum'] + self.cfg.train.z_loss * stats['z_sum']
    if 'aux_loss' in stats:
      loss = loss + loss_scale * stats['aux_loss']
    return loss, stats

  def _micro_grads(self, params, micro_batch, balance, loss_scale, model=None):
    """f32 gradients of one micro-batch's summed loss, its statistics, and its per-micro-batch values."""
    (_, stats), grads = jax.value_and_grad(self._micro_loss, has_aux=True)(params, micro_batch, balance, loss_scale,
                                                                           model)
    grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
    per_micro = {}
    if self.cfg.train.micro_grad_norms:
      per_micro['micro_grad_norm'] = optax.tree.norm(grads) / jnp.maximum(stats['tokens'], 1.0)
    if self.cfg.noise_scale.enabled:  # the micro-batch's mean gradient, squared norm (framework/noise_scale.py)
      per_micro['gns_micro_sq'] = optax.tree.norm(grads, squared=True) / jnp.maximum(stats['tokens'], 1.0) ** 2
      per_micro['gns_micro_tokens'] = stats['tokens']
    return grads, stats, per_micro

  def _accumulate(self, params, batch, loss_scale):
    """Sums gradients and statistics over micro-batches with lax.scan.

    The carry holds sums (gradients, token counts, anything a model adds to `aux`, e.g. expert counts) and, for
    MoE balance groups spanning micro-batches in the running form, the group's expert counts so far; the scan's
    per-iteration outputs hold per-micro-batch values (e.g. each micro-batch's gradient norm), stacked on a
    leading axis of length train.micro_batches.
    """
    n = self.cfg.train.micro_batches
    if self.noise_per_shard:
      return self._per_shard_grads(params, batch, loss_scale)
    micro = {k: split_micro_batches(v, n) for k, v in batch.items()}
    micro = {k: self.sharder.constrain(v, (None, 'batch', 'seq')) for k, v in micro.items()}
    param_shardings = self.state_shardings.params
    moe = self.model_cfg.moe
    moe_layers = self.model_cfg.n_layers // moe.every if moe is not None else 0
    plan = moe_balance.plan(moe, moe_layers, n, self.seq_len, lambda mb: self._apply(params, mb)[1], micro)

    def one(j, mb, running):
      balance, extra = plan.balance(j, running)
      grads, stats, per_micro = self._micro_grads(params, mb, balance, loss_scale)
      return grads, stats, per_micro, plan.advance(extra, stats)

    def body(carry, xs):
      j, mb = xs
      grads, stats, per_micro, running = one(j, mb, carry[2])
      grad_sum = jax.tree.map(jnp.add, carry[0], grads)
      grad_sum = jax.tree.map(jax.lax.with_sharding_constraint, grad_sum, param_shardings)
      return (grad_sum, jax.tree.map(jnp.add, carry[1], stats), running), per_micro

    # The first micro-batch seeds the sums (no zero-filled accumulator; with n == 1 there is no loop at all).
    grads, stats, first, running = one(0, jax.tree.map(lambda x: x[0], micro), plan.initial)
    if n > 1:
      rest = (jnp.arange(1, n), jax.tree.map(lambda x: x[1:], micro))
      (grad_sum, stat_sum, _), later = jax.lax.scan(body, (grads, stats, running), rest)
      per_micro = jax.tree.map(lambda f, l: jnp.concatenate([f[None], l]), first, later)
    else:
      grad_sum, stat_sum = grads, stats
      per_micro = jax.tree.map(lambda f: f[None], first)
    return grad_sum, stat_sum, per_micro

  def _per_shard_grads(self, params, batch, loss_scale):
    """The step's gradient as the sum of each batch shard's own gradient (one micro-batch): a vmap over the
    shards with the vmapped axis on the batch's mesh axes, so every device (group) computes its rows' gradient, as
    data parallelism does before its all-reduce, and the per-shard values (the noise estimate's |G_small|^2) come
    out stacked. Each device then holds a whole gradient, not an fsdp slice of it: the estimate's memory cost."""
    shards, axes = shard_count(self.sharder.rules, dict(self.sharder.mesh.shape), 'batch')
    stacked = NamedSharding(self.sharder.mesh, PartitionSpec(axes))
    rows = {k: jax.lax.with_sharding_constraint(v.reshape(shards, v.shape[0] // shards, *v.shape[1:]), stacked)
            for k, v in batch.items()}
    grads, stats, per_shard = jax.vmap(
        lambda mb: self._micro_grads(params, mb, None, loss_scale, self._shard_model), spmd_axis_name=axes)(rows)
    grad_sum = jax.tree.map(lambda g, s: jax.lax.with_sharding_constraint(g.sum(0), s), grads,
                            self.state_shardings.params)
    return grad_sum, jax.tree.map(lambda x: x.sum(0), stats), per_shard

  def _train_step(self, state: TrainState, batch) -> tuple[TrainState, dict[str, jax.Array]]:
    tokens = jnp.maximum(jnp.sum(batch['weights']), 1.0)
    grad_sum, stats, per_micro = self._accumulate(state.params, batch, tokens)
    grads = jax.tree.map(lambda g: g / tokens, grad_sum)
    updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if self.model_cfg.moe is not None:
      params = moe_balance.update_expert_bias(params, stats['moe_counts'], self.model_cfg.moe.bias_update_rate)
    loss = stats['ce_sum'] / tokens
    grad_norm, param_norm = optax.tree.norm(grads), optax.tree.norm(params)
    metrics = {
        'loss': loss,
        'z_loss': stats['z_sum'] / tokens,
        'grad_norm': grad_norm,
        'param_norm': param_norm,
        'update_norm': optax.tree.norm(updates),
        'lr': self.lr_schedule(state.step),
        'tokens': stats['tokens'],
        # Checked before every checkpoint, so a diverged state is never saved.
        'finite': jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(param_norm),
        **{k: v for k, v in stats.items() if k not in ('ce_sum', 'z_sum', 'tokens')},  # model aux sums
        **moe_balance.load_metrics(stats),
        **{k: v for k, v in per_micro.items() if not k.startswith('gns_')},
    }
    if self.cfg.noise_scale.enabled:  # the two batch sizes' terms of the noise-scale estimate
      metrics.update(gns_small_sq=jnp.mean(per_micro['gns_micro_sq']), gns_big_sq=optax.tree.norm(grads, squared=True),
                     gns_b_small=jnp.mean(per_micro['gns_micro_tokens']), gns_b_big=stats['tokens'])
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  def _eval_step(self, params, batch) -> dict[str, jax.Array]:
    logits, _ = self._apply(params, batch)
    losses = token_losses(logits, batch['targets'], batch['weights'])
    return {'ce_sum': losses['ce_sum'], 'tokens': losses['tokens']}

  # --- host <-> device ---------------------------------------------------------------------------------------

  def data_shard(self) -> tuple[int, int]:
    """(index, count): this process feeds rows [index * B / count, (index + 1) * B / count) of the global batch.

    Processes whose devices hold the same batch rows (e.g. tensor parallelism across hosts) must feed the same
    rows, so this follows the batch sharding rather than the process index.
    """
    b = self.cfg.train.batch_size
    spans: dict[int, set] = {}
    for device, index in self.batch_sharding['inputs'].devices_indices_map((b, self.seq_len)).items():
      rows = index[0]
      spans.setdefault(device.process_index, set()).add((rows.start or 0, b if rows.stop is None else rows.stop))
    blocks = {p: (min(a for a, _ in s), max(e for _, e in s), sum(e - a for a, e in s)) for p, s in spans.items()}
    size = blocks[jax.process_index()][1] - blocks[jax.process_index()][0]
    for p, (start, stop, covered) in blocks.items():
      if stop - start != size or covered != size or start % size:
        raise ValueError(f'config mesh: the batch rows of process {p} are not one contiguous block of the global '
                         'batch; put the axes that cross hosts on the batch (e.g. mesh.dcn_data) or change '
                         'mesh.axis_rules')
    return blocks[jax.process_index()][0] // size, b // size

  def device_batch(self, local_batch: dict) -> dict[str, jax.Array]:
    """This process's rows (numpy, see `data_shard`) -> global arrays sharded over the batch axes."""
    shape = (self.cfg.train.batch_size, self.seq_len)
    return {k: jax.make_array_from_process_local_data(self.batch_sharding[k], local_batch[k], shape)
            for k in self.batch_keys}

  @property
  def flops_per_token(self) -> float:
    count = armt_lib.flops_per_token if self.model_cfg.armt is not None else flops_per_token
    return count(self.model_cfg, self.seq_len)
