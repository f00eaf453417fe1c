"""Batch-size rules on hand-computed values, and their application at launch (changed values logged and saved)."""
import json
import logging as py_logging
import math

import jax
import pytest

from framework import config as config_lib
from framework import loop
from framework import scaling


def test_lr_rules():
  assert scaling.scale_lr(1e-3, 4.0, 'linear') == pytest.approx(4e-3)
  assert scaling.scale_lr(1e-3, 4.0, 'sqrt') == pytest.approx(2e-3)
  assert scaling.scale_lr(1e-3, 4.0, 'none') == 1e-3
  assert scaling.scale_lr(3e-4, 0.25, 'sqrt') == pytest.approx(1.5e-4)


def test_beta2_keeps_its_half_life_in_tokens():
  # 0.95 has a half-life of ln(0.5)/ln(0.95) = 13.51 steps; at 4x the batch that is 3.378 steps of 4x the tokens.
  b2 = scaling.scale_beta2(0.95, 4.0)
  assert b2 == pytest.approx(0.95 ** 4) == pytest.approx(0.81450625)
  assert math.log(0.5) / math.log(b2) * 4 == pytest.approx(math.log(0.5) / math.log(0.95))


def test_weight_decay_keeps_the_adamw_timescale():
  # tau = B / (lr * wd * D): B 32 -> 128 with lr 1e-3 -> 2e-3 needs wd 0.1 -> 0.2 for the same tau.
  wd = scaling.scale_weight_decay(0.1, 4.0, 1e-3, 2e-3)
  assert wd == pytest.approx(0.2)
  assert 32 / (1e-3 * 0.1) == pytest.approx(128 / (2e-3 * wd))


def _cfg(batch, reference, **rules):
  cfg = config_lib.defaults()
  cfg.train.batch_size = batch
  cfg.optim.update(lr=1e-3, b2=0.95, weight_decay=0.1)
  cfg.scaling.update(reference_batch_size=reference, **rules)
  return cfg


def test_apply_rescales_and_says_why():
  cfg = _cfg(64, 16)
  changes = {field: (old, new) for field, old, new, _ in scaling.apply(cfg)}
  assert changes == {'optim.lr': (1e-3, pytest.approx(2e-3)), 'optim.b2': (0.95, pytest.approx(0.95 ** 4)),
                     'optim.weight_decay': (0.1, pytest.approx(0.2))}
  assert cfg.optim.lr == pytest.approx(2e-3) and cfg.optim.b2 == pytest.approx(0.95 ** 4)
  assert scaling.apply(_cfg(16, 16)) == [] and scaling.apply(_cfg(64, 0)) == []
  linear = _cfg(64, 16, lr_rule='linear', beta2_rule='none', weight_decay_rule='none')
  assert [c[0] for c in scaling.apply(linear)] == ['optim.lr'] and linear.optim.lr == pytest.approx(4e-3)


def test_bad_rule_names_the_field():
  cfg = _cfg(16, 16, lr_rule='cubic')
  with pytest.raises(ValueError, match='config scaling.lr_rule'):
    config_lib.validate(cfg, num_devices=8)


def test_launch_logs_and_saves_the_rescaled_values(tmp_path, caplog):
  cfg = config_lib.defaults()
  cfg.model.update(d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=64, max_seq_len=32)
  cfg.data.update(seq_len=32, max_corpus_bytes=2_000_000)
  cfg.train.update(steps=1, batch_size=8, log_every=1, eval_every=0)
  cfg.optim.update(lr=1e-3, b2=0.95, weight_decay=0.1, warmup_steps=0)
  cfg.scaling.reference_batch_size = 2
  cfg.checkpoint.enabled = False
  with caplog.at_level(py_logging.INFO, logger='absl'):
    loop.train(cfg, str(tmp_path), devices=jax.devices()[:1])
  scaled = [r.getMessage() for r in caplog.records if r.getMessage().startswith('scaling: ')]
  assert scaled == ['scaling: optim.lr 0.001 -> 0.002 (sqrt rule, train.batch_size=8 vs scaling.reference_batch_size=2)',
                    'scaling: optim.b2 0.95 -> 0.814506 (beta2 half-life kept in tokens, train.batch_size=8 vs '
                    'scaling.reference_batch_size=2)',
                    'scaling: optim.weight_decay 0.1 -> 0.2 (AdamW timescale B/(lr*decay*D) kept, '
                    'train.batch_size=8 vs scaling.reference_batch_size=2)']
  saved = json.loads((tmp_path / 'config.json').read_text())
  assert saved['optim']['lr'] == pytest.approx(2e-3) and saved['optim']['weight_decay'] == pytest.approx(0.2)
  assert cfg.optim.lr == 1e-3  # the caller's config is left as it was
