"""A draft model for speculative decoding with lm_tiny as the target (framework/inference/speculative.py): the
same byte vocabulary and corpus, one layer of width 128 (~0.2M parameters, ~1/15 of lm_tiny's compute per
token). Train it like the target:

  python -m launch.train --config=configs/lm_tiny.py --workdir=/tmp/target
  python -m launch.train --config=configs/lm_tiny_draft.py --workdir=/tmp/draft
  python -m launch.bench --suite=speculative --config=configs/lm_tiny.py --workdir=/tmp/target \
      --draft_config=configs/lm_tiny_draft.py --draft_workdir=/tmp/draft
"""
import configs.lm_tiny as lm_tiny


def get_config(arg=None):
  cfg = lm_tiny.get_config(arg)
  cfg.model.update(d_model=128, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=384)
  return cfg
