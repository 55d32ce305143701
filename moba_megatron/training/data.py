"""Training data: Megatron indexed datasets, or built-in synthetic long-context retrieval.

Synthetic retrieval needs no download.

Each sequence is filler from a fixed noisy bigram rule (learnable, so the loss falls quickly) with
``pairs`` key/value needles, ``KEY k v``, planted anywhere before the questions; it ends with
``QUERY k v`` for each of them, in another order. Predicting each ``v`` means finding ``k`` up to a
whole sequence back, so training meets every distance the needle eval asks about, and MoBA's routing
matters for the far ones. More pairs give more retrieval targets a step (a denser signal to learn from).

Sample ``i`` is a pure function of (seed, i), whatever batch it is drawn in, so any rank can produce
any sample and a resumed run sees exactly the data it would have seen. The bigram rule is the task's,
not the run's: ``--seed`` draws the samples only, so a fine-tune with another seed meets the language
its base learnt.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

BOS, KEY, QUERY = 0, 1, 2
FIRST_FILLER = 3
DEFAULT_VOCAB = 256  # the synthetic task's vocabulary without --vocab-size
RULE_SEED = 1234  # the filler's bigram rule is drawn from this seed whatever --seed is (Megatron's default)


MASK32 = 2**32 - 1


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x * c mod 2**32`` for int64 ``x`` in [0, 2**32), in two halves so no product leaves int64."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finalizer: a bijection in which every input bit flips each output bit about half the time."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


class _Draws:
    """Random draws for a batch of samples, counter-based: draw ``what`` of a sample at place ``i`` is
    a hash of (the sample's seed, what, i). So a whole batch is a few tensor ops (a generator per
    sample bounded short-sequence training), and a sample does not depend on the batch it is drawn in."""

    # Stream ids 3 and 4 are retired (they drew repeated filler spans); the others keep their ids so
    # every sample stays the same.
    NOISE, RESTART = 1, 2
    KEYS, VALUES, SLOTS, ASKED, QUESTIONS = range(5, 10)

    def __init__(self, seeds: torch.Tensor):
        self.seeds = _mix32(seeds.long() & MASK32)[:, None]

    def bits(self, what: int, count: int) -> torch.Tensor:
        """``[samples, count]`` uniform integers in [0, 2**32)."""
        stream = _mix32(self.seeds ^ _mix32(torch.tensor(what)))
        return _mix32((stream + torch.arange(count)) & MASK32)

    def uniform(self, what: int, count: int) -> torch.Tensor:
        return self.bits(what, count).double() / 2**32

    def integers(self, what: int, count: int, high: int) -> torch.Tensor:
        """``[samples, count]`` uniform in [0, high), high < 2**31."""
        return (self.bits(what, count) * high) >> 32

    def permutations(self, what: int, count: int) -> torch.Tensor:
        """``[samples, count]``: a random permutation of ``range(count)`` per sample."""
        return self.bits(what, count).argsort(dim=1, stable=True)


class SyntheticRetrieval:
    """Tokens: ``BOS``, ``KEY``, ``QUERY``, then the needle keys (an eighth of the rest, at least
    ``pairs``), then the filler. Keys occur nowhere but in needles and questions, so the question's key
    matches the needle alone; values are filler tokens. A sample is the filler (a noisy bigram chain)
    holding ``pairs`` needles ``KEY k v``, then a block of questions ``QUERY k v`` asking each once, in
    another order; the block sits anywhere after the needles, with filler after it."""

    NEEDLE_STREAM = 2

    def __init__(self, vocab_size: int, seq_length: int, seed: int, pairs: int = 1, noise: float = 0.1):
        self.keys = max(pairs, (vocab_size - FIRST_FILLER) // 8)
        if vocab_size < FIRST_FILLER + 8 or vocab_size - FIRST_FILLER - self.keys < 4:
            need = max(FIRST_FILLER + 8, FIRST_FILLER + pairs + 4)
            raise ValueError(f"--vocab-size must be >= {need} for the synthetic data with --retrieval-pairs "
                             f"{pairs}, got {vocab_size}")
        if seq_length < 8 + 6 * pairs:
            raise ValueError(f"--seq-length {seq_length} is too short for {pairs} retrieval pair(s)")
        self.vocab_size, self.seq_length, self.seed, self.pairs, self.noise = vocab_size, seq_length, seed, pairs, noise
        self.first_filler = FIRST_FILLER + self.keys
        self.fillers = vocab_size - self.first_filler
        g = torch.Generator().manual_seed(RULE_SEED)
        # The bigram rule walks one long cycle through all filler tokens (no fixed points).
        self.cycle = self.first_filler + torch.randperm(self.fillers, generator=g)
        self.position = torch.empty(vocab_size, dtype=torch.long)
        self.position[self.cycle] = torch.arange(self.fillers)

    def samples(self, indices: list[int], stream: int = 0) -> torch.Tensor:
        """Tokens ``[len(indices), seq_length + 1]``: inputs are ``[:, :-1]``, labels ``[:, 1:]``.
        Streams are disjoint sample sequences (training 0, validation 1, the needle probes
        ``NEEDLE_STREAM``)."""
        draws = self._draws(indices, stream)
        n, pairs = self.seq_length + 1, self.pairs
        tokens = self._filler(draws, n)
        keys = FIRST_FILLER + draws.permutations(draws.KEYS, self.keys)[:, :pairs]
        values = self.first_filler + draws.integers(draws.VALUES, pairs, self.fillers)
        # The questions start anywhere in [1 + 3 * pairs, n - 3 * pairs], filler after them: where
        # they sit says nothing about the sequence's length, so a model trained short meets no
        # surprise where a longer sequence goes on (with the questions always last, it learnt their
        # place and lost retrieval at the first lengthening; benchmarks/RESULTS.md).
        asked_at = 1 + 3 * pairs + draws.integers(draws.QUESTIONS, 1, n - 6 * pairs)  # [samples, 1]
        # each needle in its own slot of three tokens, anywhere before the questions: the pairs
        # smallest of random ranks, slots past the questions ranked last
        room = (asked_at - 1) // 3
        ranks = draws.uniform(draws.SLOTS, (n - 3 * pairs - 1) // 3)
        ranks[torch.arange(ranks.shape[1]) >= room] = 2.0
        slots = 1 + 3 * ranks.argsort(dim=1, stable=True)[:, :pairs]
        needles = torch.stack([torch.full_like(keys, KEY), keys, values], -1)  # [samples, pairs, 3]
        tokens.scatter_(1, (slots[..., None] + torch.arange(3)).flatten(1), needles.flatten(1))
        asked = draws.permutations(draws.ASKED, pairs)
        questions = needles.gather(1, asked[..., None].expand(-1, -1, 3))  # the needles in another order
        questions[..., 0] = QUERY
        tokens.scatter_(1, asked_at + torch.arange(3 * pairs), questions.flatten(1))
        return tokens

    def sample(self, index: int, stream: int = 0) -> torch.Tensor:
        """Sample ``index`` of ``stream``: tokens ``[seq_length + 1]``."""
        return self.samples([index], stream)[0]

    def _draws(self, indices: list[int], stream: int) -> _Draws:
        """The draws of these samples of ``stream``: each sample's seed is a pure function of (seed, index, stream)."""
        return _Draws((self.seed * 1_000_003 + torch.tensor(indices, dtype=torch.long) + stream * 0x9E3779B9) & MASK32)

    def _filler(self, draws: _Draws, n: int) -> torch.Tensor:
        """``[samples, n]`` tokens of the noisy bigram chain, ``BOS`` first."""
        noise = draws.uniform(draws.NOISE, n) < self.noise
        noise[:, 0] = True
        random_tokens = self.first_filler + draws.integers(draws.RESTART, n, self.fillers)
        # After each noisy token the chain steps along the cycle: token i is the (i - r)-th
        # successor of the random token at r, the last noisy position at or before i.
        steps = torch.arange(n)
        last_reset = torch.cummax(torch.where(noise, steps, 0), dim=1).values
        start = self.position[random_tokens.gather(1, last_reset)]
        tokens = self.cycle[(start + steps - last_reset) % self.fillers]
        tokens[:, 0] = BOS
        return tokens

    def needle(self, index: int, length: int, depth: float) -> torch.Tensor:
        """A retrieval probe of ``length + 1`` tokens (inputs ``[:-1]``): one ``KEY k v`` needle at
        ``depth`` (0: the start, 1: just before the question) and ``QUERY k v`` at the end, so the
        last input's label is ``v``. Its own stream of samples, apart from training and validation."""
        if length < 8:
            raise ValueError(f"a needle probe needs at least 8 tokens, got length {length}")
        draws = self._draws([index], self.NEEDLE_STREAM)
        n = length + 1
        tokens = self._filler(draws, n)[0]
        key = FIRST_FILLER + int(draws.integers(draws.KEYS, 1, self.keys))
        value = self.first_filler + int(draws.integers(draws.VALUES, 1, self.fillers))
        at = 1 + round(depth * (n - 7))
        tokens[at : at + 3] = torch.tensor([KEY, key, value])
        tokens[-3:] = torch.tensor([QUERY, key, value])
        return tokens

    # What each label of a sample is; the ones after KEY and QUERY are random draws, except the
    # question's value, which is the needle's: the retrieval.
    KINDS = ("filler", "needle key", "needle value", "question key", "question value", "markers")

    def label_kinds(self, tokens: torch.Tensor) -> torch.Tensor:
        """The kind (an index into ``KINDS``) of each label ``tokens[1:]`` of a sample or probe."""
        labels, before = tokens[1:], tokens[:-1]
        before2 = torch.cat([before.new_full((1,), BOS), before[:-1]])
        kinds = torch.zeros_like(labels)
        for kind, marker, prior in ((1, KEY, before), (2, KEY, before2), (3, QUERY, before), (4, QUERY, before2)):
            kinds[prior == marker] = kind
        kinds[(labels == KEY) | (labels == QUERY)] = 5
        return kinds

    def chance_loss(self, kind: int) -> float | None:
        """The loss of a uniform guess over the choices of a random kind (None for the learnable
        ones); for the question's value, the floor of a model that does not retrieve."""
        keys, fillers = math.log(self.keys), math.log(self.fillers)
        return {1: keys, 2: fillers, 3: keys, 4: fillers}.get(kind)

    def batch(self, indices: list[int], stream: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        data = self.samples(indices, stream)
        return data[:, :-1].contiguous(), data[:, 1:].contiguous()


class SyntheticSplit:
    """A split of the synthetic task: its own stream of samples, so the validation split never
    meets a training sample (an unbounded task needs no ``--split`` ratios)."""

    TRAIN, VALID = 0, 1

    def __init__(self, task: SyntheticRetrieval, stream: int):
        self.task, self.stream = task, stream

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.task.batch(indices, self.stream)


class IndexedGPTData:
    """Megatron indexed dataset(s) (``PREFIX.bin``/``PREFIX.idx``) through megatron-core's GPTDataset:
    documents concatenated and cut into ``seq_length + 1`` token samples, shuffled by seed, split
    into train / validation / test documents by ``split`` ("969,30,1" as in Megatron-LM)."""

    def __init__(self, prefixes: list[str], tokenizer, seq_length: int, seed: int, num_samples: int,
                 split: str = "100,0,0", valid_samples: int = 0):
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

        for prefix in prefixes:
            missing = [f"{prefix}{ext}" for ext in (".bin", ".idx") if not Path(f"{prefix}{ext}").is_file()]
            if missing:
                raise ValueError(
                    f"--data-path {prefix}: {' and '.join(missing)} not found; build them with "
                    "python -m moba_megatron.tools.preprocess_data --input FILE --output-prefix PREFIX"
                )
        config = GPTDatasetConfig(
            random_seed=seed,
            sequence_length=seq_length,
            blend=(prefixes, None),
            split=split,
            tokenizer=tokenizer,
            reset_position_ids=False,
            reset_attention_mask=False,
            eod_mask_loss=False,
            create_attention_mask=False,
        )
        sizes = [num_samples, valid_samples or None, None]
        train, valid, _ = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
        if train is None:
            raise ValueError(f"--split {split} leaves no documents for training")
        self.train = _Samples(train)
        self.valid = _Samples(valid) if valid is not None and valid_samples else None

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.train.batch(indices)


class _Samples:
    def __init__(self, dataset):
        self.dataset = dataset

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        samples = [self.dataset[i % len(self.dataset)] for i in indices]
        return torch.stack([s["tokens"] for s in samples]).long(), torch.stack([s["labels"] for s in samples]).long()
