"""A tiny associative recurrent memory transformer: 4 layers, segments of 32 tokens with 8 memory tokens."""
from framework import config


def get_config(arg=None):
  del arg
  cfg = config.defaults()
  cfg.model.update(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=384, max_seq_len=256)
  cfg.armt.update(segment_len=32, memory_tokens=8, d_mem=16, executor='diagonal')
  cfg.data.seq_len = 128  # 4 segments per row
  cfg.train.update(steps=300, batch_size=16, log_every=20, eval_every=100, eval_batches=4)
  cfg.optim.update(lr=2e-3, warmup_steps=30, schedule='cosine')
  cfg.checkpoint.update(every_steps=100, keep_last=2)
  return cfg
