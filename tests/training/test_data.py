"""Data: the preprocessing tool (Megatron-LM's flags and names), megatron-core's tokenizers and
indexed datasets, the vocabulary padding, the synthetic task."""

import json
import math

import pytest
import torch

from moba_megatron.tools.preprocess_data import main as preprocess_main
from moba_megatron.tools.preprocess_data import preprocess
from moba_megatron.training.data import KEY, QUERY, IndexedGPTData, SyntheticRetrieval, SyntheticSplit
from moba_megatron.training.tokenizer import build_tokenizer, padded_vocab_size


@pytest.mark.slow
def test_preprocess_jsonl_and_text_round_trip(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    docs = ["héllo world", "second document", "x"]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d, "title": d.upper()}) + "\n" for d in docs))
    (tmp_path / "c.txt").write_text("\n".join(docs) + "\n")
    tok = build_tokenizer("ByteTokenizer")
    for name in ("c.jsonl", "c.txt"):
        prefix = str(tmp_path / f"out-{name}")
        assert preprocess(tmp_path / name, prefix, ["text"], append_eod=True) == {"text": 3}
        ds = IndexedDataset(f"{prefix}_text_document")
        assert [tok.detokenize(ds[i][:-1].tolist()) for i in range(len(ds))] == docs
        assert all(int(ds[i][-1]) == tok.eod for i in range(len(ds)))
    # several keys, several worker processes: one dataset per key, documents in order, no EOD
    preprocess_main(["--input", str(tmp_path / "c.jsonl"), "--output-prefix", str(tmp_path / "k"),
                     "--json-keys", "text", "title", "--workers", "2"])
    for key, want in (("text", docs), ("title", [d.upper() for d in docs])):
        ds = IndexedDataset(str(tmp_path / f"k_{key}_document"))
        assert [tok.detokenize(ds[i].tolist()) for i in range(len(ds))] == want


def test_preprocess_bad_input_names_the_problem(tmp_path, capsys):
    (tmp_path / "c.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(ValueError, match=r"c.jsonl:2: not a JSON object with the key\(s\) \['text'\]"):
        preprocess(tmp_path / "c.jsonl", str(tmp_path / "o"), ["text"])
    for flags, message in (
        (["--tokenizer-type", "HuggingFaceTokenizer"], "needs --tokenizer-model DIR"),
        (["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(tmp_path)], "no tokenizer.json there"),
        (["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(tmp_path / "nope")], "no such folder"),
    ):
        with pytest.raises(SystemExit):
            preprocess_main(["--input", str(tmp_path / "c.jsonl"), "--output-prefix", str(tmp_path / "o"), *flags])
        assert message in capsys.readouterr().err


def test_vocab_follows_the_tokenizer_padded_as_megatron_pads_it():
    assert padded_vocab_size(50257, None, 128, 1) == 50304
    assert padded_vocab_size(50257, None, 128, 2) == 50432
    assert padded_vocab_size(256, 1000, 128, 1) == 1024
    with pytest.raises(ValueError, match="--vocab-size 100 is smaller than the tokenizer's 256 tokens"):
        padded_vocab_size(256, 100, 128, 1)


def test_indexed_samples_splits_and_missing_paths(tmp_path):
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": "abc " * n}) + "\n" for n in range(1, 60)))
    preprocess(tmp_path / "c.jsonl", str(tmp_path / "c"), ["text"], append_eod=True)
    tok = build_tokenizer("ByteTokenizer")
    data = IndexedGPTData([str(tmp_path / "c_text_document")], tok, seq_length=32, seed=1, num_samples=10,
                          split="80,20,0", valid_samples=4)
    tokens, labels = data.batch([0, 1, 2])
    assert tokens.shape == labels.shape == (3, 32) and tokens.dtype == torch.long
    assert torch.equal(tokens[:, 1:], labels[:, :-1])  # labels are the next tokens
    assert data.valid is not None and data.valid.batch([0, 1])[0].shape == (2, 32)
    assert IndexedGPTData([str(tmp_path / "c_text_document")], tok, 32, 1, 10, "100,0,0", 4).valid is None
    with pytest.raises(ValueError, match=r"--data-path .*nope: .*nope.bin and .*nope.idx not found; build them with"):
        IndexedGPTData([str(tmp_path / "nope")], tok, 32, 1, 10)


def questions_at(sample: torch.Tensor, pairs: int) -> int:
    """Where a sample's block of ``pairs`` questions starts (checking that it is one block)."""
    start = int((sample == QUERY).nonzero()[0])
    assert torch.equal((sample == QUERY).nonzero().flatten(), torch.arange(start, start + 3 * pairs, 3))
    return start


def test_synthetic_retrieval_plants_and_asks_needles():
    data = SyntheticRetrieval(vocab_size=64, seq_length=200, seed=3, pairs=2)
    sample = data.sample(5)
    assert sample.shape == (201,) and torch.equal(sample, data.sample(5))  # a pure function of the index
    at = questions_at(sample, 2)
    planted = (sample[:at] == KEY).nonzero().flatten().tolist()
    needles = {(int(sample[p + 1]), int(sample[p + 2])) for p in planted}
    asked = sample[at : at + 6].view(2, 3)
    assert len(needles) == 2 and {(int(k), int(v)) for k, v in asked[:, 1:]} == needles  # each planted, each asked
    assert not (sample[at + 6 :] <= QUERY).any()  # filler after the questions
    # The questions end anywhere (filler after them), the needles anywhere before them: training
    # meets every distance the eval asks about, and no place says where the sequence ends.
    starts = torch.tensor([questions_at(data.sample(i), 2) for i in range(200)])
    assert starts.min() <= 15 and starts.max() >= 185 and starts.unique().numel() > 100
    places = torch.cat([(data.sample(i) == KEY).nonzero().flatten() for i in range(40)])
    assert places.min() < 20 and places.max() > 170
    for key, _ in needles:  # a key occurs in its needle and its question, nowhere in the filler
        assert (sample == key).sum() == 2
    probe = data.needle(0, 150, 0.5)
    assert int((probe == int(probe[-2])).sum()) == 2 and probe[-3] == QUERY
    valid = SyntheticSplit(data, SyntheticSplit.VALID)
    assert not torch.equal(valid.batch([0])[0], SyntheticSplit(data, SyntheticSplit.TRAIN).batch([0])[0])
    with pytest.raises(ValueError, match="--seq-length 10 is too short"):
        SyntheticRetrieval(64, 10, 0, pairs=2)


def test_synthetic_batch_is_its_samples_and_draws_are_uniform():
    data = SyntheticRetrieval(vocab_size=64, seq_length=300, seed=3, pairs=4)
    batch = data.samples([9, 2, 9, 40])
    assert torch.equal(batch[1], data.sample(2)) and torch.equal(batch[0], batch[2])  # whatever batch holds it
    assert not torch.equal(batch[0], batch[3]) and not torch.equal(
        batch[1], SyntheticRetrieval(64, 300, 4, 4).sample(2)
    )
    tokens = data.samples(list(range(400)))
    # the chain's noise rate and the spread of filler tokens, values and needle places
    filler = data._filler(data._draws(list(range(400)), 0), 301)[:, 1:]
    follows = data.position[filler[:, 1:]] == (data.position[filler[:, :-1]] + 1) % data.fillers
    assert abs(1 - follows.float().mean().item() - 0.1 * (1 - 1 / data.fillers)) < 0.02
    counts = torch.bincount(filler.flatten() - data.first_filler, minlength=data.fillers).double()
    assert (counts / counts.mean() - 1).abs().max() < 0.1
    asked = (tokens == QUERY).nonzero()[:, 1].view(-1, 4)
    values = tokens.gather(1, asked + 2).flatten() - data.first_filler  # the questions' values
    assert torch.bincount(values, minlength=data.fillers).max() < 3 * len(values) / data.fillers
    # the question block starts uniformly over [1 + 12, 301 - 12]
    starts = asked[:, 0].double()
    assert torch.histc(starts, bins=4, min=13, max=290).min() > 0.18 * len(starts)
    # each needle uniformly over the slots before its questions
    slots = (tokens == KEY).nonzero()
    share = slots[:, 1].double() / starts[slots[:, 0]]
    assert torch.histc(share, bins=4, min=0, max=1).min() > 0.2 * len(share)


def test_synthetic_seed_draws_the_samples_not_the_filler_rule():
    # A fine-tune with another --seed (the retrieval study's seeds) must meet the language its base
    # learnt: other samples, the same bigram cycle.
    base, other = SyntheticRetrieval(64, 300, 1234, 4), SyntheticRetrieval(64, 300, 2, 4)
    assert torch.equal(base.cycle, other.cycle)
    assert not torch.equal(base.sample(0), other.sample(0))
    filler = other._filler(other._draws(list(range(50)), 0), 301)[:, 1:]
    follows = base.position[filler[:, 1:]] == (base.position[filler[:, :-1]] + 1) % base.fillers
    assert follows.float().mean() > 0.85  # the base's rule predicts the other seed's filler


def test_synthetic_label_kinds_name_each_label():
    data = SyntheticRetrieval(vocab_size=64, seq_length=200, seed=3, pairs=2)
    sample = data.sample(5)
    kinds = data.label_kinds(sample)
    labels = sample[1:]
    names = [data.KINDS[k] for k in kinds.tolist()]
    at = questions_at(sample, 2)
    assert names[at - 1 : at + 5] == ["markers", "question key", "question value"] * 2  # the labels of the questions
    assert names.count("needle key") == names.count("needle value") == 2
    planted = (sample == KEY).nonzero().flatten()
    assert sorted((kinds == 1).nonzero().flatten().tolist()) == planted.tolist()  # the label after KEY
    assert torch.equal(labels[kinds == 2].sort().values, sample[planted + 2].sort().values)
    assert torch.equal(labels[kinds == 4].sort().values, labels[kinds == 2].sort().values)  # asked = planted
    assert (labels[kinds == 0] >= data.first_filler).all() and (
        (labels[kinds == 5] == KEY) | (labels[kinds == 5] == QUERY)
    ).all()
    fillers = 64 - data.first_filler
    assert data.chance_loss(4) == pytest.approx(math.log(fillers)) and data.chance_loss(3) == pytest.approx(
        math.log(data.keys)
    )
    assert data.chance_loss(0) is None and data.chance_loss(5) is None
    probe = data.needle(0, 150, 0.5)
    assert data.KINDS[int(data.label_kinds(probe)[-1])] == "question value"  # the needle eval's answer
