"""The PyTorch peer (launch/torch_peer.py) computes what batchax's train step computes.

The peer shares no code with framework/, so agreement checks both: from the same initial parameters and packed
batches, the loss (CE and z-loss) agrees to 1e-5 relative and three AdamW steps (lr 0 in warmup, then peak, then
cosine decay; clipping active; decay masked off the norm scales) give the same parameters. A wrong RoPE
convention, GQA grouping, segment mask, decay mask or schedule moves them by orders of magnitude more.
"""
import sys

import jax
import numpy as np
import pytest

from framework import config as config_lib
from framework import optim
from framework.corpus import PackedStream
from framework.data import batch_for_step
from framework.mesh import make_sharder
from framework.train import Trainer

STEPS = 3
LR = 1e-2
GRAD_CLIP = 0.5  # below the tiny model's gradient norms (~7), so clipping scales every step


@pytest.fixture(scope='module')
def torch_peer():
  pytest.importorskip('torch', reason="PyTorch is the optional 'peer' extra: pip install -e '.[peer]'")
  from launch import torch_peer as module  # pylint: disable=g-import-not-at-top
  return module


def tiny_config(**model):
  cfg = config_lib.defaults()
  cfg.model.update(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, max_seq_len=32, vocab_size=512,
                   **model)
  cfg.data.seq_len = 32
  cfg.train.update(batch_size=4, steps=6, z_loss=1e-2)  # z-loss large enough to move the loss past tolerance
  cfg.optim.update(name='adamw', lr=LR, schedule='cosine', warmup_steps=1, weight_decay=0.1, grad_clip=GRAD_CLIP)
  cfg.mesh.update(data=1)
  return cfg


def packed_batches(cfg) -> list[dict]:
  """Rows of several documents each (BOS about every 10 tokens), so segment masks and position resets matter."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, 259, size=4000).astype(np.int32)
  tokens[rng.random(tokens.size) < 0.1] = 1
  stream = PackedStream.from_tokens(tokens)
  batches = [batch_for_step(stream, k, seed=0, global_batch=cfg.train.batch_size, seq_len=cfg.data.seq_len)
             for k in range(STEPS)]
  assert all(b['segment_ids'].max() >= 3 for b in batches)
  return batches


def run_both(torch_peer, cfg):
  """(batchax metrics per step, batchax params before and after, torch's (loss, CE) at init, the torch peer)."""
  trainer = Trainer(cfg, make_sharder(cfg, jax.devices()[:1]))
  state = trainer.init(jax.random.key(0))
  init = jax.tree.map(np.array, state.params)  # a copy: train_step donates the buffers it may share
  peer = torch_peer.Peer(trainer.model_cfg, cfg.optim, cfg.train.steps, cfg.train.z_loss)
  torch_peer.load_batchax_params(peer, jax.device_get(state.params))
  batches = packed_batches(cfg)

  first = torch_peer.to_torch(batches[0])
  logits = peer.model(first['inputs'], first['positions'], first['segment_ids'])
  total, ce = (x.item() for x in torch_peer.loss_terms(logits.detach(), first['targets'], first['weights'],
                                                       cfg.train.z_loss))
  metrics = []
  for b in batches:
    state, m = trainer.train_step(state, trainer.device_batch(b))
    metrics.append(jax.device_get(m))
    peer.step(torch_peer.to_torch(b))
  return metrics, (init, jax.device_get(state.params)), (total, ce), peer


@pytest.fixture(scope='module', params=[False, True], ids=['untied', 'tied'])
def both(request, torch_peer):
  cfg = tiny_config(tie_embeddings=request.param)
  return cfg, run_both(torch_peer, cfg)


def test_loss_matches_batchax(both):
  cfg, (metrics, _, (total, ce), _) = both
  np.testing.assert_allclose(ce, metrics[0]['loss'], rtol=1e-5)
  np.testing.assert_allclose(total, metrics[0]['loss'] + cfg.train.z_loss * metrics[0]['z_loss'], rtol=1e-5)


def test_adamw_steps_match_batchax(both, torch_peer):
  cfg, (metrics, (_, params), _, peer) = both
  assert all(float(m['grad_norm']) > GRAD_CLIP for m in metrics), 'clipping must be exercised'
  assert [float(m['lr']) for m in metrics] == pytest.approx([0.0, LR, torch_peer.lr_at(cfg.optim, 6, 2)])
  expected = torch_peer.param_mapping(params)
  got = {k: v.detach().numpy() for k, v in peer.model.state_dict().items()}
  assert expected.keys() == got.keys()
  # Two real AdamW updates move weights by up to ~2 * lr = 2e-2, and decaying a norm scale (a wrong mask) would
  # move it by lr * weight_decay = 1e-3. Rounding differences between the implementations (summation order,
  # Adam's normalisation of small gradients) measured <= 2.3e-6 (embedding rows, the MLP output), most ~2e-7.
  for name in expected:
    np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=1e-3 * LR, err_msg=name)


def test_steps_really_move_params(both, torch_peer):
  # Guards the comparison above against steps that do nothing (e.g. every lr 0).
  _, (_, (init, params), _, _) = both
  before, after = torch_peer.param_mapping(init), torch_peer.param_mapping(params)
  assert min(np.abs(after[k] - before[k]).max() for k in before) > LR


@pytest.mark.parametrize('schedule', optim.SCHEDULES)
def test_lr_schedule_matches_optax(schedule, torch_peer):
  o = config_lib.defaults().optim
  o.update(schedule=schedule, warmup_steps=7, lr=3e-3, min_lr_ratio=0.1, decay_fraction=0.3)
  expected = optim.schedule(o, 50)
  for step in range(60):
    assert torch_peer.lr_at(o, 50, step) == pytest.approx(float(expected(step)), rel=1e-5, abs=1e-12), step


def test_bench_without_torch_says_how_to_install(monkeypatch):
  from launch import bench  # pylint: disable=g-import-not-at-top
  monkeypatch.setitem(sys.modules, 'torch', None)  # makes `import torch` raise ImportError
  with pytest.raises(ValueError, match=r"pip install -e '\.\[peer\]'"):
    bench._import_torch()  # pylint: disable=protected-access
