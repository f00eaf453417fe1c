"""The quickstart model: ~3M parameters, trains on the embedded corpus in a few minutes on 2 CPU cores."""
from framework import config


def get_config(arg=None):
  del arg
  cfg = config.defaults()
  cfg.model.update(d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=768, max_seq_len=256)
  cfg.data.seq_len = 128
  cfg.train.update(steps=300, batch_size=16, log_every=20, eval_every=100, eval_batches=4)
  cfg.optim.update(lr=2e-3, warmup_steps=30, schedule='cosine')
  cfg.checkpoint.update(every_steps=100, keep_last=2)
  return cfg
