"""`optim.make_optimizer` against the update rules written out here in numpy (float64).

LAMB (Adam moments with bias correction, decoupled weight decay, trust ratio ||w|| / ||update||), LARS (weight
decay, then the trust ratio 0.001 ||w|| / ||g + wd w||, then momentum) and SGD with momentum each take three
steps on a small params tree with norm `scale` leaves (one stacked [layers, d] as nn.scan stores it), with a
different gradient every step so the moments matter. Trust ratios are per layer, as the papers define them: a
scanned weight stacked [layers, ...] under 'layers' gets one ratio per layer slice, other weights one per leaf;
norm scales get neither decay nor a trust ratio. Gradient clipping by global norm is checked on both sides
of the threshold, and the optimizer's learning rate is checked to follow the configured schedule step by step.
The schedule values themselves are tested in tests/test_model.py.

The inputs make every effect large (weight decay 0.5 on weights ~2, trust ratios far from 1, gradients of
global norm ~20 clipped to 1), and the cases assert so where it is not plain, so an optimizer that silently
dropped one would fail.
"""
import math

import jax
import numpy as np
import pytest

from framework import config as config_lib
from framework import optim

# Float32 updates against float64 formulas: a few float32 roundings (~1e-7 relative) per term. Terms that
# nearly cancel (Adam step + decay) leave errors relative to the leaf's largest update, hence the atol scale.
RTOL = 2e-5
STEPS = 3

SHAPES = {
    'embedding': (6, 4),
    'final_norm': {'scale': (4,)},
    'layers': {'attn_norm': {'scale': (2, 4)}, 'mlp': {'wo': (2, 4, 3)}},
}


def is_scale(path) -> bool:
  return getattr(path[-1], 'key', None) == 'scale'


def params0() -> dict:
  """Weights ~ N(0, 2^2) and norm scales ~ 1 + N(0, 0.1^2), float32."""
  rng = np.random.default_rng(0)
  def leaf(path, shape):
    x = 1.0 + 0.1 * rng.standard_normal(shape) if is_scale(path) else 2.0 * rng.standard_normal(shape)
    return x.astype(np.float32)
  return jax.tree_util.tree_map_with_path(leaf, SHAPES, is_leaf=lambda s: isinstance(s, tuple))


def grads_for(step: int, scale: float = 1.0) -> dict:
  rng = np.random.default_rng(100 + step)
  return jax.tree.map(lambda shape: (scale * rng.standard_normal(shape)).astype(np.float32), SHAPES,
                      is_leaf=lambda s: isinstance(s, tuple))


def optim_cfg(name, **kw):
  cfg = config_lib.defaults().optim
  cfg.update(**{**dict(name=name, schedule='constant', warmup_steps=0, grad_clip=0.0), **kw})
  return cfg


def leaves(tree) -> dict:
  return {jax.tree_util.keystr(p): (p, np.asarray(x, np.float64))
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def run_optimizer(cfg, grads_per_step, total_steps=100):
  """The framework optimizer's updates, one dict {leaf name: update} per step, applied as training does."""
  opt = optim.make_optimizer(cfg, total_steps)
  params = params0()
  state = opt.init(params)
  update = jax.jit(opt.update)
  out = []
  for g in grads_per_step:
    updates, state = update(g, state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
    out.append({k: u for k, (_, u) in leaves(updates).items()})
  return out


def run_reference(rule, grads_per_step):
  """`rule(t, path, w, g, slots) -> update` (t from 1) over the steps, in float64; `slots`, a dict per leaf,
  carries moments from step to step."""
  params = {k: w for k, (_, w) in leaves(params0()).items()}
  paths = {k: p for k, (p, _) in leaves(params0()).items()}
  slots = {k: {} for k in params}
  out = []
  for t, grads in enumerate(grads_per_step, start=1):
    g = {k: x for k, (_, x) in leaves(grads).items()}
    step = {k: rule(t, paths[k], params[k], g[k], slots[k]) for k in params}
    params = {k: params[k] + step[k] for k in params}
    out.append(step)
  return out


def assert_updates_equal(got, expected):
  assert len(got) == len(expected)
  for t, (a, b) in enumerate(zip(got, expected), start=1):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_allclose(a[k], b[k], rtol=RTOL, atol=RTOL * np.abs(b[k]).max(), err_msg=f'step {t}, {k}')


def norm(x) -> float:
  return float(np.sqrt(np.sum(x * x)))


def layer_norms(path, x):
  """||x|| per layer: per slice of the leading axis for a parameter stacked under 'layers', else the whole leaf."""
  if getattr(path[0], 'key', None) == 'layers':
    return np.sqrt(np.sum(x * x, axis=tuple(range(1, x.ndim)), keepdims=True))
  return norm(x)


# --- LAMB ----------------------------------------------------------------------------------------------------

def test_lamb_matches_formula():
  cfg = optim_cfg('lamb', lr=0.05, b1=0.9, b2=0.95, eps=1e-6, weight_decay=0.5)
  ratios = {}

  def lamb(t, path, w, g, s):
    s['m'] = cfg.b1 * s.get('m', 0.0) + (1 - cfg.b1) * g
    s['v'] = cfg.b2 * s.get('v', 0.0) + (1 - cfg.b2) * g * g
    m_hat, v_hat = s['m'] / (1 - cfg.b1 ** t), s['v'] / (1 - cfg.b2 ** t)
    u = m_hat / (np.sqrt(v_hat) + cfg.eps)
    if not is_scale(path):
      u = u + cfg.weight_decay * w
    if not is_scale(path):
      ratio = layer_norms(path, w) / layer_norms(path, u)
      ratios[(t, jax.tree_util.keystr(path))] = ratio
      u = ratio * u
    return -cfg.lr * u

  grads = [grads_for(t) for t in range(STEPS)]
  assert_updates_equal(run_optimizer(cfg, grads), run_reference(lamb, grads))
  # The trust ratio really rescales: weights (norm ~2 sqrt(n)) against Adam steps of ~1 per element.
  assert max(np.abs(r - 1).max() for r in ratios.values()) > 0.5
  # The stacked weight's layers really get different ratios (one ratio over both layers would not pass above).
  stacked = ratios[(1, "['layers']['mlp']['wo']")].ravel()
  assert abs(stacked[0] - stacked[1]) > 0.05 * stacked.max()


# --- LARS ----------------------------------------------------------------------------------------------------

LARS_TRUST = 0.001  # optax.lars' default trust coefficient, which make_optimizer keeps


def test_lars_matches_formula():
  cfg = optim_cfg('lars', lr=0.5, momentum=0.9, weight_decay=0.5)

  def lars(t, path, w, g, s):
    del t
    if is_scale(path):
      u = g  # no decay and no trust ratio on norm scales
    else:
      u = g + cfg.weight_decay * w
      u = LARS_TRUST * layer_norms(path, w) / layer_norms(path, u) * u
    s['m'] = cfg.momentum * s.get('m', 0.0) - cfg.lr * u
    return s['m']

  grads = [grads_for(t) for t in range(STEPS)]
  got = run_optimizer(cfg, grads)
  assert_updates_equal(got, run_reference(lars, grads))
  # Weights move ~1000x less than scales (the trust coefficient), which a missing mask would erase.
  assert np.abs(got[0]["['final_norm']['scale']"]).max() > 100 * np.abs(got[0]["['embedding']"]).max()


# --- SGD with momentum ---------------------------------------------------------------------------------------


def test_sgd_momentum_matches_formula():
  cfg = optim_cfg('sgd', lr=0.1, momentum=0.9, weight_decay=0.5)

  def sgd(momentum):
    def rule(t, path, w, g, s):
      del t
      u = g if is_scale(path) else g + cfg.weight_decay * w
      s['m'] = momentum * s.get('m', 0.0) + u
      return -cfg.lr * s['m']
    return rule

  grads = [grads_for(t) for t in range(STEPS)]
  got = run_optimizer(cfg, grads)
  assert_updates_equal(got, run_reference(sgd(cfg.momentum), grads))
  # Momentum matters by step 3: plain SGD's update differs by O(lr).
  plain = run_reference(sgd(0.0), grads)
  assert np.abs(got[2]["['embedding']"] - plain[2]["['embedding']"]).max() > 0.1


# --- gradient clipping ---------------------------------------------------------------------------------------


@pytest.mark.parametrize('grad_scale,clipped', [(3.0, True), (0.05, False)])
def test_grad_clip_by_global_norm(grad_scale, clipped):
  """Gradients are scaled to global norm grad_clip when above it, untouched below, and before weight decay."""
  cfg = optim_cfg('sgd', lr=0.1, momentum=0.0, weight_decay=0.5, grad_clip=1.0)
  grads = [grads_for(t, grad_scale) for t in range(2)]
  global_norms = [math.sqrt(sum(np.sum(x * x) for _, x in leaves(g).values())) for g in grads]
  assert all((n > cfg.grad_clip) == clipped for n in global_norms)  # the case is on the intended side
  factors = [min(1.0, cfg.grad_clip / n) for n in global_norms]

  def clipped_sgd(t, path, w, g, s):
    del s
    g = g * factors[t - 1]
    return -cfg.lr * (g if is_scale(path) else g + cfg.weight_decay * w)

  assert_updates_equal(run_optimizer(cfg, grads), run_reference(clipped_sgd, grads))
  if clipped:
    assert max(factors) < 0.2


# --- the schedule drives the optimizer -----------------------------------------------------------------------


def test_optimizer_steps_follow_the_warmup_cosine_schedule():
  total, warmup, peak, floor = 10, 3, 0.5, 0.05

  def lr_at(t):  # t = optimizer steps already taken
    if t < warmup:
      return peak * t / warmup
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * (t - warmup) / (total - warmup)))

  cfg = optim_cfg('sgd', lr=peak, momentum=0.0, weight_decay=0.0)
  cfg.update(schedule='cosine', warmup_steps=warmup, min_lr_ratio=floor / peak)
  grads = [grads_for(t) for t in range(6)]
  expected = run_reference(lambda t, path, w, g, s: -lr_at(t - 1) * g, grads)
  assert_updates_equal(run_optimizer(cfg, grads, total_steps=total), expected)
