"""colabs/06_batched_inference.ipynb: it trains a target and a draft, then shows (and asserts in its cells) that
static vs continuous batching, prefix sharing and speculative decoding leave greedy outputs unchanged, and that
the HTTP server answers what the engine does. Here: its figures against the checkpoint it left, read anew."""
import jax
import pytest

from notebook_runner import run_notebook


@pytest.mark.slow  # about 2 minutes on 2 cores; the default suite stays under 15
def test_batched_inference_notebook(tmp_path):
  from configs import lm_tiny
  from framework.inference.engine import Engine, serving_sharder
  from framework.inference.loading import params_from_workdir
  from framework.inference.requests import Request
  from framework.inference.sampling import SamplingParams
  result = run_notebook('06_batched_inference.ipynb', workdir=tmp_path, corpus_bytes=2_000_000)
  assert result['_plots'] == 1
  assert result['kv_pages_peak']['on'] < result['kv_pages_peak']['off']
  assert result['shared_pages'] == 7 * (97 // 16)
  assert 0 <= result['acceptance_rate'] <= 1 and 1 <= result['tokens_per_target_pass'] <= 5
  assert len(result['throughput']) == len(result['slots']) and all(t > 0 for t in result['throughput'])
  # The server's greedy texts, recomputed here from the target's checkpoint on two devices (tensor parallel).
  cfg = lm_tiny.get_config()
  cfg.model.update(d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=384, max_seq_len=256)
  cfg.mesh.update(data=1, fsdp=1, tensor=2)
  sharder = serving_sharder(cfg, jax.devices()[:2])
  engine = Engine(cfg, params_from_workdir(cfg, str(tmp_path / 'target'), sharder), sharder=sharder)
  from framework import corpus
  with open(corpus.embedded_files()[0][1]) as f:
    text = f.read()
  prompts = [text[i:i + 32] for i in (0, 32)]
  want = engine.generate([Request(prompt=p, sampling=SamplingParams(max_tokens=32, ignore_eos=True))
                          for p in prompts])
  assert result['server_texts'] == [r.text for r in want]
