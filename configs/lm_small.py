"""~26M parameters: the CPU benchmark model (`python -m launch.bench --suite=train`)."""
from framework import config


def get_config(arg=None):
  del arg
  cfg = config.defaults()
  cfg.model.update(d_model=512, n_layers=6, n_heads=8, n_kv_heads=8, d_ff=2048, max_seq_len=1024)
  cfg.data.seq_len = 256
  cfg.train.update(steps=2000, batch_size=16, log_every=20, eval_every=200, eval_batches=8)
  cfg.optim.update(lr=1e-3, warmup_steps=100, schedule='wsd')
  cfg.checkpoint.update(every_steps=500, keep_last=2, keep_every=1000)
  return cfg
