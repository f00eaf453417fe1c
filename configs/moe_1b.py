"""An MoE for GPU/TPU: 1.41B parameters in all, ~0.55B active per token (bf16, FSDP x expert parallel, remat).

lm_1b's attention and width (d_model 2048, 16 layers, 32 heads, 8 kv heads), every layer an MoE of 8 SwiGLU
experts (d_ff 1408 each) with top-2 routing, global-batch balance. The mesh puts the experts on the 'expert' axis
(2-way: each device holds 4 of them) and everything else on fsdp; the dropless path uses the Pallas grouped
matmul there. Check the fit before getting the chips: python -m launch.compile --config=configs/moe_1b.py
--topology=v5p:2x2x1. For pre-tokenized data: --config.data.source=array --config.data.path=tokens.npy.
"""
from framework import config


def get_config(arg=None):
  del arg
  cfg = config.defaults()
  cfg.model.update(vocab_size=32768, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64, d_ff=2816,
                   max_seq_len=8192, rope_theta=500000.0, tie_embeddings=False, param_dtype='float32',
                   dtype='bfloat16', remat_policy='dots_no_batch', attention_impl='auto')
  cfg.moe.update(num_experts=8, top_k=2, d_ff_expert=1408, balance_scope='global', balance_weight=1e-2,
                 router_z_loss=1e-3, dispatch='dropless', gmm_impl='auto')
  cfg.data.update(seq_len=2048, max_corpus_bytes=64_000_000)
  cfg.train.update(steps=10000, batch_size=32, micro_batches=1, log_every=10, eval_every=500, eval_batches=8)
  cfg.optim.update(lr=3e-4, warmup_steps=500, schedule='cosine', b2=0.95, weight_decay=0.1)
  cfg.mesh.update(data=1, fsdp=-1, expert=2)
  cfg.checkpoint.update(every_steps=500, keep_last=3, keep_every=2500)
  return cfg
