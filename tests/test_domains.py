"""The multi-domain corpus: deterministic documents, labels that follow every token through packing and batching."""
import numpy as np
import pytest

from framework import config as config_lib
from framework import data as data_lib
from framework import domains


@pytest.fixture(scope='module')
def splits():
  cfg = config_lib.defaults()
  cfg.data.update(source='domains', max_corpus_bytes=600_000, seq_len=64)
  return data_lib.load_splits(cfg.data)


def test_every_domain_is_present_in_both_splits_and_generated_the_same_each_time(splits):
  train, heldout = splits
  assert set(np.unique(train.doc_domains)) == set(range(len(domains.DOMAINS)))
  assert set(np.unique(heldout.doc_domains)) <= set(range(len(domains.DOMAINS)))
  first = list(domains.documents(iter(()), 40_000))
  again = list(domains.documents(iter(()), 40_000))
  assert first == again and {d for _, _, d in first} == {1, 2, 3}


def test_labels_follow_each_token_to_its_document(splits):
  train, _ = splits
  b = data_lib.batch_for_step(train, 3, seed=5, global_batch=8, seq_len=64)
  # Recompute each input token's document from the stream and read its label: the batch must agree.
  n = train.num_windows(64)
  starts = train.permutation(5, (3 * 8) // n, n, np.arange(3 * 8, 4 * 8) % n) * 65
  positions = starts[:, None] + np.arange(64)
  doc = np.searchsorted(train.doc_starts, positions, side='right') - 1
  np.testing.assert_array_equal(b['domains'], train.doc_domains[doc])
  np.testing.assert_array_equal(b['inputs'], train.take(positions).astype(np.int32))
  # A process's share of the batch carries the same labels as those rows of the global batch.
  half = data_lib.batch_for_step(train, 3, seed=5, global_batch=8, seq_len=64, process_index=1, process_count=2)
  np.testing.assert_array_equal(half['domains'], b['domains'][4:])


def test_domain_texts_look_like_their_names():
  docs = {d: data for _, data, d in domains.documents(iter([('a.py', b'import os\n')]), 40_000)}
  assert docs[0] == b'import os\n'
  assert b' = ' in docs[1] and docs[1].split(b'\n')[0].split(b' ')[1] in (b'+', b'-', b'*')
  assert docs[2].startswith(b'>seq_') and set(docs[2].split(b'\n')[1]) <= set(b'ACGT')
  assert docs[3].startswith(b'{"id": ')
