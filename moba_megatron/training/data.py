"""Training data: Megatron indexed datasets, or built-in synthetic long-context retrieval.

Synthetic retrieval needs no download.

Each sequence is filler from a fixed noisy bigram rule (learnable, so the loss falls quickly) with
``pairs`` key/value needles, ``KEY k v``, planted anywhere before the questions; it ends with
``QUERY k v`` for each of them, in another order. Predicting each ``v`` means finding ``k`` up to a
whole sequence back, so training meets every distance the needle eval asks about, and MoBA's routing
matters for the far ones. More pairs give more retrieval targets a step (a denser signal to learn from).

With ``echoes`` a fraction of the filler is random spans shown twice, at random span-aligned places
(their distance a multiple of ``ECHO_SPAN``): text-like repetition that only copying from context
predicts, meant to reward that copying (an induction head) on many more tokens than the needles
give. In the runs so far it did not make models answer the needles (benchmarks/RESULTS.md).
Sample ``i`` is a pure function of (seed, i), so any rank can produce any sample and a resumed run
sees exactly the data it would have seen.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

BOS, KEY, QUERY = 0, 1, 2
FIRST_FILLER = 3
DEFAULT_VOCAB = 256  # the synthetic task's vocabulary without --vocab-size
ECHO_SPAN = 32  # tokens of each repeated span of --retrieval-echoes


class SyntheticRetrieval:
    """Tokens: ``BOS``, ``KEY``, ``QUERY``, then the needle keys (an eighth of the rest, at least
    ``pairs``), then the filler. Keys occur nowhere but in needles and questions, so the question's key
    matches the needle alone; values are filler tokens."""

    NEEDLE_STREAM = 2

    def __init__(self, vocab_size: int, seq_length: int, seed: int, pairs: int = 1, noise: float = 0.1,
                 echoes: float = 0.0):
        self.keys = max(pairs, (vocab_size - FIRST_FILLER) // 8)
        if vocab_size < FIRST_FILLER + 8 or vocab_size - FIRST_FILLER - self.keys < 4:
            need = max(FIRST_FILLER + 8, FIRST_FILLER + pairs + 4)
            raise ValueError(f"--vocab-size must be >= {need} for the synthetic data with --retrieval-pairs "
                             f"{pairs}, got {vocab_size}")
        if seq_length < 8 + 6 * pairs:
            raise ValueError(f"--seq-length {seq_length} is too short for {pairs} retrieval pair(s)")
        if not 0.0 <= echoes < 1.0:
            raise ValueError(f"--retrieval-echoes is the fraction of filler in repeated spans, in [0, 1); got {echoes}")
        self.vocab_size, self.seq_length, self.seed, self.pairs, self.noise = vocab_size, seq_length, seed, pairs, noise
        self.echoes = echoes
        self.first_filler = FIRST_FILLER + self.keys
        g = torch.Generator().manual_seed(seed)
        # The bigram rule walks one long cycle through all filler tokens (no fixed points).
        self.cycle = self.first_filler + torch.randperm(vocab_size - self.first_filler, generator=g)
        self.position = torch.empty(vocab_size, dtype=torch.long)
        self.position[self.cycle] = torch.arange(vocab_size - self.first_filler)

    def sample(self, index: int, stream: int = 0) -> torch.Tensor:
        """Tokens ``[seq_length + 1]``: inputs are ``[:-1]``, labels ``[1:]``. Streams are disjoint
        sample sequences (training 0, validation 1, the needle probes ``NEEDLE_STREAM``)."""
        g = self._generator(index, stream)
        n = self.seq_length + 1
        tokens = self._filler(g, n)
        keys = FIRST_FILLER + torch.randperm(self.keys, generator=g)[: self.pairs]
        values = self.first_filler + torch.randint(self.vocab_size - self.first_filler, (self.pairs,), generator=g)
        before_questions = n - 3 * self.pairs
        slots = torch.randperm((before_questions - 1) // 3, generator=g)[: self.pairs] * 3 + 1
        for s, k, v in zip(slots.tolist(), keys.tolist(), values.tolist()):
            tokens[s : s + 3] = torch.tensor([KEY, k, v])
        asked = torch.randperm(self.pairs, generator=g)
        queries = torch.stack([torch.full((self.pairs,), QUERY), keys[asked], values[asked]], 1)
        tokens[n - 3 * self.pairs :] = queries.flatten()
        return tokens

    def _generator(self, index: int, stream: int) -> torch.Generator:
        """Sample ``index`` of ``stream``'s generator (the CPU generator takes 32-bit seeds)."""
        return torch.Generator().manual_seed((self.seed * 1_000_003 + index + stream * 0x9E3779B9) % 2**32)

    def _filler(self, g: torch.Generator, n: int) -> torch.Tensor:
        """``n`` tokens of the noisy bigram chain, ``BOS`` first."""
        fillers = self.vocab_size - self.first_filler
        noise = torch.rand(n, generator=g) < self.noise
        noise[0] = True
        random_tokens = self.first_filler + torch.randint(fillers, (n,), generator=g)
        # After each noisy token the chain steps along the cycle: token i is the (i - r)-th
        # successor of the random token at r, the last noisy position at or before i.
        steps = torch.arange(n)
        last_reset = torch.cummax(torch.where(noise, steps, 0), dim=0).values
        start = self.position[random_tokens[last_reset]]
        tokens = self.cycle[(start + steps - last_reset) % fillers]
        tokens[0] = BOS
        spans = min(round(self.echoes * n) // (2 * ECHO_SPAN), (n - 1) // ECHO_SPAN // 2)
        if spans:
            # each span at two distinct span-aligned places, the first showing earlier
            places = torch.randperm((n - 1) // ECHO_SPAN, generator=g)[: 2 * spans].view(-1, 2).sort(1).values
            at = 1 + places[..., None] * ECHO_SPAN + torch.arange(ECHO_SPAN)  # [spans, 2, ECHO_SPAN]
            content = self.first_filler + torch.randint(fillers, (at.shape[0], 1, ECHO_SPAN), generator=g)
            tokens[at] = content.expand_as(at)
        return tokens

    def needle(self, index: int, length: int, depth: float) -> torch.Tensor:
        """A retrieval probe of ``length + 1`` tokens (inputs ``[:-1]``): one ``KEY k v`` needle at
        ``depth`` (0: the start, 1: just before the question) and ``QUERY k v`` at the end, so the
        last input's label is ``v``. Its own stream of samples, apart from training and validation."""
        if length < 8:
            raise ValueError(f"a needle probe needs at least 8 tokens, got length {length}")
        g = self._generator(index, self.NEEDLE_STREAM)
        n = length + 1
        tokens = self._filler(g, n)
        key = FIRST_FILLER + int(torch.randint(self.keys, (1,), generator=g))
        value = self.first_filler + int(torch.randint(self.vocab_size - self.first_filler, (1,), generator=g))
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
        fillers = self.vocab_size - self.first_filler
        return {1: math.log(self.keys), 2: math.log(fillers), 3: math.log(self.keys), 4: math.log(fillers)}.get(kind)

    def batch(self, indices: list[int], stream: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        data = torch.stack([self.sample(i, stream) for i in indices])
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
