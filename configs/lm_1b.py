"""A Llama-3.2-1B-shaped model (~1.1B parameters with a 32k vocabulary) for GPU/TPU: bf16, FSDP, remat.

For pre-tokenized data: --config.data.source=array --config.data.path=tokens.npy (ids < 32768).
"""
from framework import config


def get_config(arg=None):
  del arg
  cfg = config.defaults()
  cfg.model.update(vocab_size=32768, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64, d_ff=8192,
                   max_seq_len=8192, rope_theta=500000.0, tie_embeddings=False, param_dtype='float32',
                   dtype='bfloat16', remat_policy='dots_no_batch', attention_impl='auto')
  cfg.data.update(seq_len=2048, max_corpus_bytes=64_000_000)
  cfg.train.update(steps=10000, batch_size=32, micro_batches=1, log_every=10, eval_every=500, eval_batches=8)
  cfg.optim.update(lr=3e-4, warmup_steps=500, schedule='cosine', b2=0.95, weight_decay=0.1)
  cfg.mesh.update(data=1, fsdp=-1)
  cfg.checkpoint.update(every_steps=500, keep_last=3, keep_every=2500)
  return cfg
