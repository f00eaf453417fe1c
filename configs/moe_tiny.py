"""A small MoE on the multi-domain corpus: trains in minutes on 2 CPU cores (the balance study's model).

4 layers, d_model 128, every layer an MoE of 8 SwiGLU experts (d_ff 256 each), top-2: 0.2M feed-forward
parameters active per token per layer, as many as the dense twin's d_ff 512 has (`--config.moe.num_experts=0`
gives that twin; 3.48M parameters in all). Data: the 'domains' source (Python, arithmetic, DNA, JSON records), labels carried per token, so the
routing is reported per domain (metrics moe_domain_counts, moe_domain_mi).
"""
from framework import config


def get_config(arg=None):
  del arg
  cfg = config.defaults()
  cfg.model.update(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=512, max_seq_len=256)
  cfg.moe.update(num_experts=8, top_k=2, d_ff_expert=256, balance_weight=1e-2, router_z_loss=1e-3,
                 balance_scope='global')
  cfg.data.update(source='domains', max_corpus_bytes=4_000_000, seq_len=128)
  cfg.train.update(steps=300, batch_size=16, log_every=20, eval_every=100, eval_batches=4)
  cfg.optim.update(lr=2e-3, warmup_steps=30, schedule='cosine')
  cfg.checkpoint.update(every_steps=100, keep_last=2)
  return cfg
