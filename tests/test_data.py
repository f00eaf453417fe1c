"""Tests for the input pipeline: tokenizer, sources, splits, batches."""
import json
import os
import shutil

import ml_collections
import numpy as np
import pytest

from framework import corpus
from framework import data
from framework import permutation
from framework.tokenizer import ByteTokenizer

BOS = ByteTokenizer.BOS_ID
EOS = ByteTokenizer.EOS_ID
KEYS = ("inputs", "targets", "segment_ids", "positions", "weights")


def make_cfg(**overrides) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict(dict(
      source="embedded", path="", jsonl_field="text", bos_id=BOS,
      heldout_fraction=0.05, max_corpus_bytes=2_000_000, seq_len=64,
      prefetch=0))
  cfg.update(overrides)
  return cfg


def random_stream(seed: int = 0, n_tokens: int = 5000,
                  name: str = "train") -> np.ndarray:
  """Tokens with BOS at random places (documents of 1..60 tokens)."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, 259, size=n_tokens).astype(np.uint16)
  tokens[rng.random(n_tokens) < 0.03] = BOS
  return tokens


def docs_of(stream: corpus.PackedStream) -> list[tuple[int, ...]]:
  return [tuple(stream.document(i).tolist())
          for i in range(stream.num_documents)]


def assert_batches_equal(a: dict, b: dict) -> None:
  assert set(a) == set(b) == set(KEYS)
  for k in KEYS:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_and_specials():
  tok = ByteTokenizer()
  ids = tok.encode("héllo")
  assert ids.dtype == np.int32 and tok.vocab_size == 259
  assert ids[0] == BOS and ids[-1] == EOS and ids.max() < 259
  assert ids[1] == ord("h") + 3
  assert tok.decode(ids) == "héllo"
  assert tok.encode("ab", add_bos=False, add_eos=False).tolist() == [100, 101]
  assert tok.decode([0, 1, 2, 300, 100]) == "a"  # Specials and OOV skipped.


# ------------------------------------------------------------------ batches


@pytest.fixture(scope="module")
def stream() -> corpus.PackedStream:
  return corpus.PackedStream.from_tokens(random_stream())


def test_batch_shapes_dtypes_and_shift(stream):
  b = data.batch_for_step(stream, 3, seed=1, global_batch=8, seq_len=32)
  for k in KEYS:
    assert b[k].shape == (8, 32), k
    assert b[k].dtype == (np.float32 if k == "weights" else np.int32), k
  np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])


def test_determinism_and_steps_differ(stream):
  kw = dict(seed=7, global_batch=8, seq_len=32)
  a = data.batch_for_step(stream, 5, **kw)
  fresh = corpus.PackedStream.from_tokens(random_stream())
  assert_batches_equal(a, data.batch_for_step(fresh, 5, **kw))
  assert not np.array_equal(a["inputs"],
                            data.batch_for_step(stream, 6, **kw)["inputs"])
  other_seed = data.batch_for_step(stream, 5, **{**kw, "seed": 8})
  assert not np.array_equal(a["inputs"], other_seed["inputs"])


def test_resume_matches_uninterrupted_run():
  kw = dict(seed=3, global_batch=8, seq_len=32)
  # 700 tokens make 21 windows: the 56 examples below span epochs 0-2, and
  # the resume at step 4 starts mid-epoch 1.
  s = corpus.PackedStream.from_tokens(random_stream(n_tokens=700))
  assert s.num_windows(32) == 21
  with data.DataIterator(s, prefetch=2, **kw) as it:
    run = [next(it) for _ in range(7)]
    assert it.state() == {"next_step": 7, "next_example": 56, "seed": 3}
  fresh = corpus.PackedStream.from_tokens(random_stream(n_tokens=700))
  with data.DataIterator(fresh, start_step=4, prefetch=0, **kw) as resumed:
    for step in range(4, 7):
      assert_batches_equal(next(resumed), run[step])
    assert json.loads(json.dumps(resumed.state()))["next_step"] == 7


@pytest.mark.parametrize("prefetch", [0, 2])
def test_a_batch_size_change_continues_at_the_example_offset(prefetch):
  # 6 steps of 4 examples, then batches of 8 from example 24: together one uninterrupted stream of examples,
  # none skipped or repeated, the same as the stream read 12 examples at a time.
  s = corpus.PackedStream.from_tokens(random_stream(n_tokens=2000))
  kw = dict(seed=1, seq_len=16)
  with data.DataIterator(s, global_batch=4, prefetch=prefetch, **kw) as small:
    first = [next(small) for _ in range(6)]
    state = small.state()
  assert state["next_example"] == 24
  with data.DataIterator(s, global_batch=8, start_step=state["next_step"], start_example=state["next_example"],
                         prefetch=prefetch, **kw) as big:
    second = [next(big) for _ in range(3)]
    assert big.state() == {"next_step": 9, "next_example": 48, "seed": 1}
  joined = np.concatenate([b["inputs"] for b in first + second])
  whole = np.concatenate([data.batch_for_step(s, k, global_batch=12, **kw)["inputs"] for k in range(4)])
  np.testing.assert_array_equal(joined, whole)
  assert_batches_equal(second[0], data.batch_at(s, 24, global_batch=8, **kw))


@pytest.mark.parametrize("process_count", [2, 4, 8])
def test_process_slices_concatenate_to_global_batch(stream, process_count):
  kw = dict(seed=0, global_batch=16, seq_len=24)
  whole = data.batch_for_step(stream, 9, **kw)
  parts = [data.batch_for_step(stream, 9, process_index=p,
                               process_count=process_count, **kw)
           for p in range(process_count)]
  for k in KEYS:
    np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]),
                                  whole[k])


def test_uneven_process_split_is_refused(stream):
  with pytest.raises(ValueError, match="process_count"):
    data.batch_for_step(stream, 0, seed=0, global_batch=6, seq_len=8,
                        process_index=0, process_count=4)


def test_each_epoch_uses_every_window_exactly_once():
  seq_len, n_windows, batch = 7, 10, 4
  # Token value = stream position, so a window's first token names it; the
  # tail of 3 tokens cannot form a window and must never appear.
  tokens = np.arange(n_windows * (seq_len + 1) + 3, dtype=np.int32) + 100
  s = corpus.PackedStream(tokens, np.zeros(1, np.int64))
  firsts = np.concatenate([
      data.batch_for_step(s, step, seed=5, global_batch=batch,
                          seq_len=seq_len)["inputs"][:, 0]
      for step in range(5)])  # 20 examples = 2 epochs; steps 2 straddles.
  windows = (firsts - 100) // (seq_len + 1)
  assert np.all((firsts - 100) % (seq_len + 1) == 0)
  assert sorted(windows[:10]) == list(range(10))
  assert sorted(windows[10:]) == list(range(10))
  assert not np.array_equal(windows[:10], windows[10:])  # Fresh order.


def test_packing_features_on_hand_made_stream():
  x = 50
  tokens = np.array([x, x, BOS, x, x, EOS, BOS, x, EOS, BOS], np.uint16)
  s = corpus.PackedStream.from_tokens(tokens)
  np.testing.assert_array_equal(s.doc_starts, [0, 2, 6, 9])
  b = data.batch_for_step(s, 0, seed=0, global_batch=1, seq_len=9)
  assert b["segment_ids"][0].tolist() == [1, 1, 2, 2, 2, 2, 3, 3, 3]
  assert b["positions"][0].tolist() == [0, 1, 0, 1, 2, 3, 0, 1, 2]
  assert b["weights"][0].tolist() == [1, 0, 1, 1, 1, 0, 1, 1, 0]

  starts_with_bos = np.array([BOS, x, x, BOS, x], np.uint16)
  s = corpus.PackedStream.from_tokens(starts_with_bos)
  b = data.batch_for_step(s, 0, seed=0, global_batch=1, seq_len=4)
  assert b["segment_ids"][0].tolist() == [1, 1, 1, 2]
  assert b["positions"][0].tolist() == [0, 1, 2, 0]
  assert b["weights"][0].tolist() == [1, 1, 0, 1]


def reference_features(inputs: np.ndarray, targets: np.ndarray) -> dict:
  """Per-token loop over one row; BOS marks document starts here."""
  seg, pos, w = [], [], []
  s, p = 1, 0
  for j, tok in enumerate(inputs):
    if tok == BOS and j > 0:
      s, p = s + 1, 0
    seg.append(s)
    pos.append(p)
    w.append(0.0 if targets[j] == BOS else 1.0)
    p += 1
  return {"segment_ids": seg, "positions": pos, "weights": w}


def test_packing_features_match_per_token_reference(stream):
  b = data.batch_for_step(stream, 2, seed=4, global_batch=16, seq_len=48)
  for row in range(16):
    ref = reference_features(b["inputs"][row], b["targets"][row])
    for k, v in ref.items():
      np.testing.assert_array_equal(b[k][row], v, err_msg=f"{k} row {row}")


def test_too_small_stream_is_refused():
  s = corpus.PackedStream.from_tokens(np.array([BOS, 5, 6], np.uint16))
  with pytest.raises(ValueError, match="data.seq_len"):
    data.batch_for_step(s, 0, seed=0, global_batch=1, seq_len=8)


# -------------------------------------------------------------- permutation

_M64 = (1 << 64) - 1


def py_splitmix64(x: int) -> int:
  """splitmix64 on Python ints, written out from the published algorithm."""
  z = (x + 0x9E3779B97F4A7C15) & _M64
  z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
  z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
  return z ^ (z >> 31)


def py_permutation_at(seed: int, epoch: int, n: int, slot: int) -> int:
  """Entry `slot` of the documented construction, on Python ints."""
  k = py_splitmix64(py_splitmix64(seed) ^ epoch)
  keys = [py_splitmix64(k ^ (r + 1)) for r in range(6)]
  bits = max(1, (n - 1).bit_length())
  lo_bits, hi_bits = bits // 2, bits - bits // 2
  y = slot
  while True:  # Cycle walking: repeat the network until the value is < n.
    hi, lo = y >> lo_bits, y & ((1 << lo_bits) - 1)
    for r, key in enumerate(keys):
      if r % 2 == 0:
        hi ^= py_splitmix64((lo + key) & _M64) & ((1 << hi_bits) - 1)
      else:
        lo ^= py_splitmix64((hi + key) & _M64) & ((1 << lo_bits) - 1)
    y = (hi << lo_bits) | lo
    if y < n:
      return y


def py_permutation(seed: int, epoch: int, n: int) -> list:
  return [py_permutation_at(seed, epoch, n, i) for i in range(n)]


def test_splitmix64_matches_published_algorithm():
  # 0xE220A8397B1DCDAF is splitmix64's well-known first output from state 0.
  xs = [0, 1, 2, 12345, 2**63, _M64]
  got = permutation.splitmix64(np.array(xs, np.uint64)).tolist()
  assert got[0] == 0xE220A8397B1DCDAF
  assert got == [py_splitmix64(x) for x in xs]


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 5, 7, 8, 9, 31, 32, 33, 1000,
                               1023, 1024, 1025, 2**16, 2**16 + 1, 100_003])
def test_permutation_is_a_bijection(n):
  for seed, epoch in [(0, 0), (1, 3), (2**64 - 1, 2**64 - 1)]:
    perm = permutation.keyed_permutation(seed, epoch, n)
    assert perm.dtype == np.int64 and perm.shape == (n,)
    np.testing.assert_array_equal(np.sort(perm), np.arange(n))


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4097])
def test_permutation_matches_plain_reference(n):
  for seed, epoch in [(0, 0), (42, 7)]:
    assert (permutation.keyed_permutation(seed, epoch, n).tolist()
            == py_permutation(seed, epoch, n))


def test_permutation_is_pinned():
  # Literal values: any change to the construction changes every run's data
  # order, and must be a deliberate decision that updates these numbers.
  perm = permutation.keyed_permutation(1234, 5, 10**6)
  assert perm[:12].tolist() == [115134, 579341, 940905, 411268, 328971,
                                261896, 557457, 600272, 64792, 499055,
                                592500, 118964]
  assert permutation.keyed_permutation(1234, 5, 10).tolist() == [
      4, 7, 8, 5, 6, 1, 3, 9, 2, 0]


def test_permutation_at_slots_equals_the_full_order():
  n = 100_003  # More than one internal chunk.
  full = permutation.keyed_permutation(9, 2, n)
  slots = np.array([[0, n - 1, 65535], [65536, 17, 17]])
  got = permutation.keyed_permutation(9, 2, n, slots)
  assert got.shape == (2, 3)
  np.testing.assert_array_equal(got, full[slots])
  # A huge n costs nothing when only a few slots are asked for.
  big = 10**12
  few = np.array([0, 1, big - 1])
  assert (permutation.keyed_permutation(3, 1, big, few).tolist()
          == [py_permutation_at(3, 1, big, s) for s in few.tolist()])


def test_permutation_depends_on_seed_and_epoch():
  orders = {tuple(permutation.keyed_permutation(seed, epoch, 1000).tolist())
            for seed in range(10) for epoch in range(5)}
  assert len(orders) == 50
  # Even two items are shuffled: both orders occur over seeds.
  pairs = {tuple(permutation.keyed_permutation(seed, 0, 2).tolist())
           for seed in range(20)}
  assert pairs == {(0, 1), (1, 0)}


def test_permutation_looks_shuffled():
  n = 100_000
  idx = np.arange(n)
  for seed in range(3):
    perm = permutation.keyed_permutation(seed, 0, n)
    # A random permutation has |corr| ~ 1/sqrt(n) = 0.003 and ~1 fixed point.
    assert abs(np.corrcoef(idx, perm)[0, 1]) < 0.02
    assert np.count_nonzero(perm == idx) < 10
    # Neighbouring slots land far apart: mean gap ~ n/3 for a random order.
    assert 0.3 < np.abs(np.diff(perm)).mean() / n < 0.37


# 8 needs no cycle walking; 9 walks most (9 of a 16-value domain).
@pytest.mark.parametrize("n", [8, 9])
def test_position_of_first_item_is_uniform_over_seeds(n):
  seeds = 2000
  where = [int(np.flatnonzero(permutation.keyed_permutation(s, 0, n) == 0)[0])
           for s in range(seeds)]
  counts = np.bincount(where, minlength=n)
  expected = seeds / n
  chi2 = ((counts - expected) ** 2 / expected).sum()
  # 99.9% quantile of chi-square with n - 1 <= 8 degrees of freedom is 26.1.
  assert chi2 < 26.1, counts


def test_permutation_refuses_bad_arguments():
  with pytest.raises(ValueError, match="seed"):
    permutation.keyed_permutation(-1, 0, 10)
  with pytest.raises(ValueError, match="epoch"):
    permutation.keyed_permutation(0, 2**64, 10)
  with pytest.raises(ValueError, match="n must"):
    permutation.keyed_permutation(0, 0, -3)
  with pytest.raises(ValueError, match=r"slots must lie in \[0, n=10\)"):
    permutation.keyed_permutation(0, 0, 10, np.array([3, 10]))
  with pytest.raises(ValueError, match="slots must be integers"):
    permutation.keyed_permutation(0, 0, 10, np.array([0.5]))


def test_batch_windows_follow_the_keyed_permutation():
  seq_len, n_windows = 3, 50
  tokens = np.arange(n_windows * (seq_len + 1), dtype=np.int32) + 100
  s = corpus.PackedStream(tokens, np.zeros(1, np.int64))
  # Step 6 of batch 8 is examples 48..55: two of epoch 0, six of epoch 1.
  firsts = data.batch_for_step(s, 6, seed=11, global_batch=8,
                               seq_len=seq_len)["inputs"][:, 0]
  want = ([py_permutation_at(11, 0, n_windows, g) for g in (48, 49)]
          + [py_permutation_at(11, 1, n_windows, g - 50)
             for g in range(50, 56)])
  assert ((firsts - 100) // (seq_len + 1)).tolist() == want


# ----------------------------------------------------------------- iterator


@pytest.mark.parametrize("prefetch", [0, 1, 3])
def test_iterator_yields_batch_for_step(stream, prefetch):
  kw = dict(seed=2, global_batch=4, seq_len=16, process_index=1,
            process_count=2)
  with data.DataIterator(stream, start_step=10, prefetch=prefetch,
                         **kw) as it:
    for step in range(10, 16):
      assert_batches_equal(next(it), data.batch_for_step(stream, step, **kw))
  if it._thread is not None:
    assert not it._thread.is_alive()
  with pytest.raises(RuntimeError, match="closed"):
    next(it)


def test_iterator_surfaces_worker_exception(stream, monkeypatch):
  real = data.batch_at

  def failing(s, first_example, **kw):
    if first_example == 4:  # step 2 of batches of 2
      raise KeyError("boom at step 2")
    return real(s, first_example, **kw)

  monkeypatch.setattr(data, "batch_at", failing)
  it = data.DataIterator(stream, seed=0, global_batch=2, seq_len=8,
                         prefetch=2)
  next(it)
  next(it)
  with pytest.raises(KeyError, match="boom"):
    next(it)
  with pytest.raises(KeyError):  # Stays failed rather than hanging.
    next(it)
  assert it.state()["next_step"] == 2
  it.close()
  assert not it._thread.is_alive()


def test_eval_batches_are_fixed(stream):
  kw = dict(seed=9, global_batch=4, seq_len=16)
  first = list(data.eval_batches(stream, 3, **kw))
  second = list(data.eval_batches(stream, 3, **kw))
  assert len(first) == 3
  for a, b in zip(first, second):
    assert_batches_equal(a, b)
  assert not np.array_equal(first[0]["inputs"], first[1]["inputs"])


# ------------------------------------------------------------------ sources


def write_text_files(root, names):
  for name in names:
    path = os.path.join(root, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
      f.write(f"document {name}\n" * 3)


def decoded_docs(stream) -> set[str]:
  tok = ByteTokenizer()
  return {tok.decode(d) for d in docs_of(stream)}


def test_text_glob_split_is_disjoint_and_stable(tmp_path):
  names = [f"sub{i % 3}/doc{i:02d}.txt" for i in range(40)]
  write_text_files(tmp_path / "a", names)
  (tmp_path / "a" / "skip.md").write_text("not matched")
  cfg = make_cfg(source="text", path=str(tmp_path / "a" / "**" / "*.txt"),
                 heldout_fraction=0.3, seq_len=8)
  train, held = data.load_splits(cfg)
  want = {f"document {n}\n" * 3 for n in names}
  assert decoded_docs(train) | decoded_docs(held) == want
  assert not decoded_docs(train) & decoded_docs(held)
  assert held.num_documents and train.num_documents
  for d in docs_of(train):
    assert d[0] == BOS and d[-1] == EOS

  # Adding files and moving the dataset keep every document's split.
  shutil.copytree(tmp_path / "a", tmp_path / "b")
  write_text_files(tmp_path / "b", [f"new/doc{i}.txt" for i in range(30)])
  cfg.path = str(tmp_path / "b" / "**" / "*.txt")
  train2, held2 = data.load_splits(cfg)
  assert decoded_docs(train) <= decoded_docs(train2)
  assert decoded_docs(held) <= decoded_docs(held2)


def test_max_corpus_bytes_stops_reading(tmp_path):
  write_text_files(tmp_path, [f"d{i:02d}.txt" for i in range(20)])
  one = os.path.getsize(tmp_path / "d00.txt")
  cfg = make_cfg(source="text", path=str(tmp_path / "*.txt"),
                 heldout_fraction=0.5, max_corpus_bytes=3 * one + 1, seq_len=2)
  train, held = corpus.build_splits(cfg)
  assert train.num_documents + held.num_documents == 4


def test_jsonl_reads_the_named_field(tmp_path):
  lines = [json.dumps({"body": f"story number {i}", "text": "decoy"})
           for i in range(60)]
  lines.insert(5, "")  # Blank lines are skipped.
  (tmp_path / "part0.jsonl").write_text("\n".join(lines[:30]) + "\n")
  (tmp_path / "part1.jsonl").write_text("\n".join(lines[30:]) + "\n")
  cfg = make_cfg(source="jsonl", path=str(tmp_path / "*.jsonl"),
                 jsonl_field="body", heldout_fraction=0.2, seq_len=8)
  train, held = data.load_splits(cfg)
  got = decoded_docs(train) | decoded_docs(held)
  assert got == {f"story number {i}" for i in range(60)}
  assert train.num_documents + held.num_documents == 60
  assert not decoded_docs(train) & decoded_docs(held)


def test_jsonl_record_without_the_field_is_refused_at_load(tmp_path):
  lines = [json.dumps({"text": "fine"}), json.dumps({"title": "no text"})]
  (tmp_path / "r.jsonl").write_text("\n".join(lines) + "\n")
  cfg = make_cfg(source="jsonl", path=str(tmp_path / "r.jsonl"))
  data.validate_data_config(cfg)  # Only the first record is checked early.
  with pytest.raises(ValueError, match=r"data.jsonl_field.*line 2"):
    data.load_splits(cfg)


def test_npy_source_splits_documents_without_copying(tmp_path):
  rng = np.random.default_rng(1)
  docs = [tuple([BOS] + rng.integers(3, 1000, size=rng.integers(1, 40))
                .tolist()) for _ in range(300)]
  tokens = np.array([t for d in docs for t in d], np.int32)
  np.save(tmp_path / "ids.npy", tokens)
  cfg = make_cfg(source="array", path=str(tmp_path / "ids.npy"),
                 heldout_fraction=0.25, seq_len=16)
  train, held = data.load_splits(cfg)
  assert isinstance(train.tokens, np.memmap)
  assert sorted(docs_of(train) + docs_of(held)) == sorted(docs)
  assert 30 < held.num_documents < 120  # About a quarter, by hash.
  assert not set(docs_of(train)) & set(docs_of(held))
  # A split made of many runs gives the same batches as a contiguous copy.
  copy = corpus.PackedStream.from_tokens(
      np.concatenate([np.array(d) for d in docs_of(train)]))
  kw = dict(seed=0, global_batch=8, seq_len=16)
  for step in (0, 7):
    assert_batches_equal(data.batch_for_step(train, step, **kw),
                         data.batch_for_step(copy, step, **kw))
  assert train.fingerprint() == copy.fingerprint()
  # Appending documents keeps every earlier document in its split.
  more = np.concatenate([tokens, np.array([BOS, 7, 8, BOS, 9], np.int32)])
  np.save(tmp_path / "ids.npy", more)
  train2, held2 = data.load_splits(cfg)
  assert set(docs_of(held)) <= set(docs_of(held2))
  assert set(docs_of(train)) <= set(docs_of(train2))


def test_embedded_corpus_loads_both_splits():
  cfg = make_cfg(seq_len=128, max_corpus_bytes=2_000_000)
  train, held = data.load_splits(cfg)
  assert train.tokens.dtype == np.uint16
  assert train.num_windows(128) > 100 and held.num_windows(128) > 0
  assert len(train) + len(held) >= 2_000_000
  assert not decoded_docs(held) & decoded_docs(train)
  rels = [rel for rel, _ in corpus.embedded_files()]
  assert rels == sorted(rels) and "os.py" in rels
  assert not any(part in ("test", "tests", "site-packages", "idle_test")
                 for rel in rels for part in rel.split(os.sep))
  b = data.batch_for_step(train, 0, seed=0, global_batch=4, seq_len=128)
  assert b["inputs"].max() < ByteTokenizer.vocab_size


def test_check_vocab(tmp_path):
  text = corpus._pack([b"abc"], "train")
  data.check_vocab(text, 259)
  with pytest.raises(ValueError, match="model.vocab_size"):
    data.check_vocab(text, 256)  # Byte streams need all 259 ids.
  array = corpus.PackedStream.from_tokens(np.array([1, 5, 700], np.int32))
  data.check_vocab(array, 701)
  with pytest.raises(ValueError, match="model.vocab_size.*701"):
    data.check_vocab(array, 700)
  negative = corpus.PackedStream.from_tokens(np.array([1, -4], np.int32))
  with pytest.raises(ValueError, match="data.path"):
    data.check_vocab(negative, 1000)


# ------------------------------------------------------------- bad configs


def bad_cases(tmp_path):
  np.save(tmp_path / "two_d.npy", np.zeros((4, 4), np.int32))
  np.save(tmp_path / "floats.npy", np.zeros(16, np.float32))
  (tmp_path / "notnpy.npy").write_text("hello")
  (tmp_path / "r.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
  (tmp_path / "bad.jsonl").write_text("{not json\n")
  missing = str(tmp_path / "nothing" / "*.txt")
  return {
      "source": (dict(source="web"), "data.source"),
      "text_glob": (dict(source="text", path=missing), "data.path: no file"),
      "empty_path": (dict(source="text", path=""), "data.path"),
      "embedded_path": (dict(path="/x"), "data.path"),
      "jsonl_field": (dict(source="jsonl", path=str(tmp_path / "r.jsonl"),
                           jsonl_field="body"), "data.jsonl_field"),
      "jsonl_syntax": (dict(source="jsonl", path=str(tmp_path / "bad.jsonl")),
                       "data.path"),
      "array_2d": (dict(source="array", path=str(tmp_path / "two_d.npy")),
                   "data.path"),
      "array_float": (dict(source="array", path=str(tmp_path / "floats.npy")),
                      "data.path"),
      "array_not_npy": (dict(source="array",
                             path=str(tmp_path / "notnpy.npy")), "data.path"),
      "array_missing": (dict(source="array", path=str(tmp_path / "no.npy")),
                        "data.path: no file"),
      "seq_len": (dict(seq_len=1), "data.seq_len"),
      "heldout_zero": (dict(heldout_fraction=0.0), "data.heldout_fraction"),
      "heldout_big": (dict(heldout_fraction=0.6), "data.heldout_fraction"),
      "prefetch": (dict(prefetch=-1), "data.prefetch"),
      "max_bytes": (dict(max_corpus_bytes=0), "data.max_corpus_bytes"),
  }


@pytest.mark.parametrize("case", [
    "source", "text_glob", "empty_path", "embedded_path", "jsonl_field",
    "jsonl_syntax", "array_2d", "array_float", "array_not_npy",
    "array_missing", "seq_len", "heldout_zero", "heldout_big", "prefetch",
    "max_bytes"])
def test_bad_config_names_the_field(tmp_path, case):
  overrides, needle = bad_cases(tmp_path)[case]
  with pytest.raises(ValueError) as err:
    data.validate_data_config(make_cfg(**overrides))
  assert needle in str(err.value)
  assert ";" in str(err.value)  # "data.<field>: problem; how to fix it".


def test_split_too_small_is_refused(tmp_path):
  (tmp_path / "tiny.txt").write_text("hi")
  cfg = make_cfg(source="text", path=str(tmp_path / "*.txt"), seq_len=64,
                 heldout_fraction=0.5)
  with pytest.raises(ValueError, match=r"split has \d+ tokens.*data.seq_len"):
    data.load_splits(cfg)
