"""Data: the preprocessing tool, indexed datasets through megatron-core, the synthetic task."""

import json

import pytest
import torch

from moba_megatron.tools.preprocess_data import preprocess
from moba_megatron.training.data import KEY, QUERY, IndexedGPTData, SyntheticRetrieval
from moba_megatron.training.tokenizer import ByteTokenizer


def test_preprocess_jsonl_and_text_round_trip(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    docs = ["héllo world", "second document", "x"]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (tmp_path / "c.txt").write_text("\n".join(docs) + "\n")
    tok = ByteTokenizer()
    for name in ("c.jsonl", "c.txt"):
        prefix = tmp_path / f"out-{name}"
        assert preprocess(tmp_path / name, prefix) == 3
        ds = IndexedDataset(str(prefix))
        assert [tok.detokenize(ds[i]) for i in range(len(ds))] == docs
        assert all(int(ds[i][-1]) == tok.eod for i in range(len(ds)))


def test_indexed_samples_and_missing_paths(tmp_path):
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": "abc " * n}) + "\n" for n in range(1, 60)))
    preprocess(tmp_path / "c.jsonl", tmp_path / "c")
    data = IndexedGPTData([str(tmp_path / "c")], ByteTokenizer(), seq_length=32, seed=1, num_samples=10)
    tokens, labels = data.batch([0, 1, 2])
    assert tokens.shape == labels.shape == (3, 32) and tokens.dtype == torch.long
    assert torch.equal(tokens[:, 1:], labels[:, :-1])  # labels are the next tokens
    with pytest.raises(ValueError, match=r"--data-path .*nope: .*nope.bin and .*nope.idx not found; build them with"):
        IndexedGPTData([str(tmp_path / "nope")], ByteTokenizer(), 32, 1, 10)


def test_synthetic_retrieval_plants_and_asks_needles():
    data = SyntheticRetrieval(vocab_size=64, seq_length=200, seed=3, pairs=2)
    sample = data.sample(5)
    assert sample.shape == (201,) and torch.equal(sample, data.sample(5))  # a pure function of the index
    assert sample[-3] == QUERY
    key, value = int(sample[-2]), int(sample[-1])
    planted = (sample[:100] == KEY).nonzero().flatten().tolist()
    assert any(int(sample[p + 1]) == key and int(sample[p + 2]) == value for p in planted)
    with pytest.raises(ValueError, match="--seq-length 10 is too short"):
        SyntheticRetrieval(64, 10, 0, pairs=2)
