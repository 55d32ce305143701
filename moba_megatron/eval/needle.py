"""Long-context retrieval: accuracy by context length and needle depth, for a checkpoint.

    torchrun --nproc-per-node 1 -m moba_megatron.eval.needle --config CKPT/moba-config.yaml --load CKPT \\
        --lengths 4096,16384,32768 --depths 0,0.25,0.5,0.75,1 --out needle [--moba-disable] [job flags]

Models of the synthetic retrieval task (no tokenizer) get the task's needles: ``KEY k v`` at the
depth, ``QUERY k`` at the end, and the answer ``v``. Models with a Hugging Face tokenizer
(``--tokenizer-model``) get a text passkey: a number hidden in filler text, asked for at the end.
A probe counts as retrieved when every answer token is the model's top prediction (teacher forced).
``--selection-tiles N,...`` (MoBA, one rank) first measures how much the gate's selections overlap
within tiles of N consecutive queries (``eval/selection.py``), into ``OUT/selection.json``.
``--token-losses N`` first reports a synthetic-task model's loss by kind of token on N validation
samples, against the chance loss of the random kinds: the question's value below its chance loss is
retrieval starting, long before a needle grid shows it.
Writes ``OUT/needle.json`` (a list of ``{"length", "depth", "accuracy", "probes", "interval"}``, the
interval a 95% Wilson interval) and ``OUT/needle.png``
(a heatmap; needs matplotlib, the ``[plot]`` extra). Runs at any TP and CP (``--lengths`` must then
split into whole MoBA blocks per CP chunk); PP must be 1.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..training.quiet import SUMMARY, fused_paths_missing, hide_known_warnings

hide_known_warnings()  # before megatron-core is first imported

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from ..training.errors import JobError, one_line_errors  # noqa: E402

_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def parse(argv=None):
    from ..training.arguments import build_parser, parse_args

    parser = build_parser()
    parser.prog = "python -m moba_megatron.eval.needle"
    g = parser.add_argument_group("needle")
    g.add_argument("--lengths", type=_ints, required=True, help="context lengths in tokens, comma-separated")
    g.add_argument("--depths", type=_floats, default=[0.0, 0.25, 0.5, 0.75, 1.0], help="needle depths in [0, 1]")
    g.add_argument("--samples", type=int, default=10, help="probes per (length, depth)")
    g.add_argument("--out", type=Path, required=True, help="folder for needle.json and needle.png")
    g.add_argument("--token-losses", type=int, default=0, metavar="N",
                   help="synthetic-task models: first the loss by kind of token over N validation samples "
                        "(--seq-length, --retrieval-pairs), into token_losses.json, and the loss by position "
                        "into position_losses.json")
    g.add_argument("--selection-tiles", type=_ints, default=[], metavar="N,...",
                   help="MoBA models, one rank: first how much the gate's selections overlap within tiles of N "
                        "consecutive queries, on one probe of the longest length, into selection.json")
    args = parse_args(argv, parser)
    if not args.load:
        parser.error("--load CKPT is required: the model to evaluate")
    for d in args.depths:
        if not 0.0 <= d <= 1.0:
            parser.error(f"--depths: {d} is not in [0, 1]")
    if args.token_losses and args.tokenizer_model:
        parser.error("--token-losses is for models of the synthetic task; this one has --tokenizer-model")
    if args.token_losses < 0:
        parser.error(f"--token-losses must be >= 0, got {args.token_losses}")
    if args.selection_tiles:
        if any(n < 1 for n in args.selection_tiles):
            parser.error(f"--selection-tiles: tiles of at least 1 query, got {args.selection_tiles}")
        if not args.moba_enabled:
            parser.error("--selection-tiles measures MoBA's gate: drop --moba-disable")
        if args.tensor_model_parallel_size * args.context_parallel_size != 1:
            parser.error("--selection-tiles runs on one rank: --tensor-model-parallel-size 1 --context-parallel-size 1")
    return args


class SyntheticProbes:
    """The synthetic task's needles; the answer is the last label."""

    def __init__(self, args):
        from ..training.data import DEFAULT_VOCAB, SyntheticRetrieval

        # The training job's task (the same keys, values and filler rule); a probe takes its own length.
        self.task = SyntheticRetrieval(
            args.vocab_size or DEFAULT_VOCAB, args.seq_length, args.seed, args.retrieval_pairs
        )
        self.tokens = self.task.vocab_size

    def probe(self, index: int, length: int, depth: float):
        tokens = self.task.needle(index, length, depth)
        return tokens, [length - 1]  # inputs tokens[:-1]; the answer is tokens[length]


class PasskeyProbes:
    """A number hidden in filler text; the answer is its tokens after "The pass key is"."""

    def __init__(self, args):
        from ..training.tokenizer import build_tokenizer

        self.tok = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_size)
        self.tokens = self.tok.vocab_size
        self.intro = self.tok.tokenize("There is important information hidden in this text. Find it and remember it.")
        self.filler = self.tok.tokenize(_FILLER)
        self.question = self.tok.tokenize(" What is the pass key? The pass key is")

    def probe(self, index: int, length: int, depth: float):
        key = str(10000 + (index * 7919 + length) % 90000)
        needle = self.tok.tokenize(f" The pass key is {key}. Remember it. {key} is the pass key.")
        answer = self.tok.tokenize(f" {key}")
        room = length + 1 - len(self.intro) - len(needle) - len(self.question) - len(answer)
        if room < 0:
            raise ValueError(f"--lengths {length} is too short for the passkey text ({length - room} tokens)")
        filler = (self.filler * math.ceil(room / max(1, len(self.filler))))[:room]
        at = round(depth * room)
        ids = self.intro + filler[:at] + needle + filler[at:] + self.question + answer
        first = len(ids) - len(answer)  # the answer's tokens are the labels of inputs first-1 ...
        return torch.tensor(ids), list(range(first - 1, len(ids) - 1))


def _logits_at(model, tokens: torch.Tensor, mine: torch.Tensor, positions: list[int], device: str):
    """The model's logits (whole vocabulary, fp32) at the global input positions ``positions`` that
    this CP rank holds: those positions and a ``[len, vocab]`` tensor."""
    from megatron.core import parallel_state

    inputs = tokens[None, :-1].to(device)[:, mine]
    with torch.no_grad():
        logits = model(inputs, mine[None], None)[0]  # [local tokens, vocab / TP]
    local = {int(p): i for i, p in enumerate(mine.tolist())}
    held = [p for p in positions if p in local]
    picked = logits[[local[p] for p in held]].float()
    tp_group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(picked) for _ in range(dist.get_world_size(tp_group))]
    dist.all_gather(parts, picked.contiguous(), group=tp_group)
    return held, torch.cat(parts, -1)


def _top_predictions(model, tokens: torch.Tensor, mine: torch.Tensor, answer_at: list[int], device: str):
    """The model's top token at each of the global input positions ``answer_at`` that this CP rank
    holds: ``{position: token}``."""
    held, logits = _logits_at(model, tokens, mine, answer_at, device)
    return dict(zip(held, logits.argmax(-1).tolist()))


def _cp_positions(args, length: int, what: str, device: str) -> torch.Tensor:
    """This CP rank's global positions of a ``length``-token input; a JobError naming ``what`` where
    the length does not split into whole MoBA blocks per CP chunk."""
    from megatron.core import parallel_state

    from ..parallel import check_cp_split, local_positions

    cp = args.context_parallel_size
    if cp > 1:
        try:
            check_cp_split(length, cp, args.moba_chunk_size)
        except ValueError as e:
            raise JobError(f"{what}: {e}") from None
    return local_positions(length, cp, parallel_state.get_context_parallel_rank(), device)


POSITION_BUCKETS = 16


def token_losses(args, model, task, device: str) -> tuple[list[dict], list[dict]]:
    """Loss and top-1 accuracy by kind of token (``SyntheticRetrieval.KINDS``) over ``args.token_losses``
    validation samples of the task at ``--seq-length`` with ``--retrieval-pairs``: whether the model
    uses its context (the question's value falls below its chance loss) before a needle grid says so.
    Also the loss by position, in ``POSITION_BUCKETS`` equal spans of the sequence (the MoBA paper's
    trailing-token loss: attention that drops far context shows as loss rising with position)."""
    from megatron.core import parallel_state

    from ..training.data import SyntheticSplit

    n = args.seq_length
    mine = _cp_positions(args, n, f"--token-losses at --seq-length {n}", device)
    kinds = len(task.KINDS)
    sums = torch.zeros(3, kinds, dtype=torch.float64, device=device)  # loss, hits, count
    spans = torch.zeros(2, POSITION_BUCKETS, dtype=torch.float64, device=device)  # loss, count
    for i in range(args.token_losses):
        tokens = task.sample(i, SyntheticSplit.VALID)
        held, logits = _logits_at(model, tokens, mine, list(range(n)), device)
        labels = tokens[1:].to(device)[held]
        kind = task.label_kinds(tokens).to(device)[held]
        loss = torch.nn.functional.cross_entropy(logits, labels, reduction="none").double()
        hits = (logits.argmax(-1) == labels).double()
        for row, value in enumerate((loss, hits, torch.ones_like(loss))):
            sums[row].index_add_(0, kind, value)
        bucket = torch.tensor(held, device=device) * POSITION_BUCKETS // n
        spans[0].index_add_(0, bucket, loss)
        spans[1].index_add_(0, bucket, torch.ones_like(loss))
    dist.all_reduce(sums, group=parallel_state.get_context_parallel_group())
    dist.all_reduce(spans, group=parallel_state.get_context_parallel_group())
    by_kind = [{"kind": name, "tokens": int(sums[2, k]), "loss": float(sums[0, k] / sums[2, k]),
                "accuracy": float(sums[1, k] / sums[2, k]), "chance_loss": task.chance_loss(k)}
               for k, name in enumerate(task.KINDS) if sums[2, k] > 0]
    by_position = [{"start": b * n // POSITION_BUCKETS, "end": (b + 1) * n // POSITION_BUCKETS,
                    "tokens": int(spans[1, b]), "loss": float(spans[0, b] / spans[1, b])}
                   for b in range(POSITION_BUCKETS) if spans[1, b] > 0]
    return by_kind, by_position


def wilson_interval(hits: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion ``hits / trials``."""
    if trials == 0:
        return 0.0, 1.0
    p = hits / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return max(0.0, centre - half), min(1.0, centre + half)


def evaluate(args, model, probes, device: str) -> list[dict]:
    from megatron.core import parallel_state

    results = []
    for length in args.lengths:
        mine = _cp_positions(args, length, f"--lengths {length}", device)
        for depth in args.depths:
            hits = torch.zeros((), device=device)
            for i in range(args.samples):
                tokens, answer_at = probes.probe(i, length, depth)
                top = _top_predictions(model, tokens, mine, answer_at, device)
                wrong = sum(int(tokens[p + 1]) != t for p, t in top.items())
                held = torch.tensor([float(wrong), float(len(top))], device=device)
                dist.all_reduce(held, group=parallel_state.get_context_parallel_group())
                hits += float(held[0] == 0 and held[1] == len(answer_at))
            low, high = wilson_interval(int(hits), args.samples)
            results.append({"length": length, "depth": depth, "accuracy": float(hits) / args.samples,
                            "probes": args.samples, "interval": [low, high]})
            if dist.get_rank() == 0:
                print(
                    f"needle: length {length:>8} depth {depth:.2f} accuracy {results[-1]['accuracy']:.2f}", flush=True
                )
    return results


def selection_overlap(args, model, probes, device: str) -> list[dict]:
    """``--selection-tiles``: how much the gate's selections overlap within query tiles
    (``eval/selection.py``), on one probe of the longest length with its needle half-way."""
    from .selection import record_selections, summary

    length = max(args.lengths)
    tokens, _ = probes.probe(0, length, 0.5)
    positions = _cp_positions(args, length, f"--lengths {length}", device)  # one rank: every position
    with record_selections(model, args.selection_tiles) as counts, torch.no_grad():
        model(tokens[None, :-1].to(device), positions[None], None)
    return summary(counts)


def length_label(tokens: int) -> str:
    return f"{tokens // 1024}K" if tokens >= 1024 else str(tokens)


def draw_heatmap(ax, results: list[dict], fontsize: int = 8):
    """Accuracy by depth (rows) and length (columns) onto matplotlib axes ``ax``; returns the image."""
    lengths = sorted({r["length"] for r in results})
    depths = sorted({r["depth"] for r in results})
    grid = [
        [next(r["accuracy"] for r in results if r["length"] == n and r["depth"] == d) for n in lengths] for d in depths
    ]
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [length_label(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths])
    ax.set_ylabel("needle depth")
    for y, row in enumerate(grid):
        for x, value in enumerate(row):
            ax.text(x, y, f"{value:.2f}", ha="center", va="center", fontsize=fontsize)
    return image


def heatmap(results: list[dict], path: Path, title: str) -> bool:
    """needle.png: accuracy by depth (rows) and length (columns). False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    lengths = {r["length"] for r in results}
    depths = {r["depth"] for r in results}
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(lengths), 1.0 + 0.55 * len(depths)))
    image = draw_heatmap(ax, results)
    ax.set_xlabel("context length (tokens)")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="retrieval accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None) -> None:
    args = parse(argv)
    with one_line_errors("needle"):
        run(args)


def run(args) -> None:
    """The needle grid (and ``--token-losses``) of ``args.load`` on torchrun's ranks."""
    import os

    from megatron.core import parallel_state

    from ..training import checkpoint
    from ..training.setup import build_model, check_layout, init_distributed, transformer_config
    from ..training.tokenizer import set_padded_vocab

    if args.pipeline_model_parallel_size != 1:
        raise JobError("the needle eval runs at --pipeline-model-parallel-size 1")
    check_layout(args, int(os.environ.get("WORLD_SIZE", "1")))
    device = init_distributed(args)
    try:
        try:
            probes = PasskeyProbes(args) if args.tokenizer_model else SyntheticProbes(args)
            set_padded_vocab(args, probes.tokens)
        except ValueError as e:  # a tokenizer or vocabulary the probes cannot use
            raise JobError(str(e)) from None
        model = build_model(args, transformer_config(args, device), device)
        loaded = checkpoint.load_weights(args.load, model)
        model.eval()
        rank0 = dist.get_rank() == 0
        kind = "passkey" if isinstance(probes, PasskeyProbes) else "synthetic key/value"
        attention = "full attention" if not args.moba_enabled else f"MoBA {args.moba_chunk_size}/{args.moba_topk}"
        if rank0:
            if fused_paths_missing():
                print(f"needle: {SUMMARY}", flush=True)
            print(f"needle: {args.load} (iteration {loaded}), {kind} needles, {attention}", flush=True)
            args.out.mkdir(parents=True, exist_ok=True)
        if args.token_losses:
            losses, by_position = token_losses(args, model, probes.task, device)
            if rank0:
                (args.out / "token_losses.json").write_text(json.dumps(losses, indent=1))
                (args.out / "position_losses.json").write_text(json.dumps(by_position, indent=1))
                print(f"needle: loss by kind of token, {args.token_losses} validation samples of {args.seq_length} "
                      f"tokens, {args.retrieval_pairs} pair(s) each", flush=True)
                for r in losses:
                    chance = "" if r["chance_loss"] is None else f"  (chance {r['chance_loss']:.3f})"
                    print(f"needle: {r['kind']:>14}: {r['tokens']:>8} tokens  loss {r['loss']:.3f}  "
                          f"top-1 {r['accuracy']:.3f}{chance}", flush=True)
        if args.selection_tiles:
            overlap = selection_overlap(args, model, probes, device)
            (args.out / "selection.json").write_text(json.dumps(overlap, indent=1))
            print(f"needle: the gate's blocks within tiles of queries, one probe of {max(args.lengths)} tokens "
                  "(union / rows: 1 is no block shared; union / candidates: the part of the tile's causal blocks)")
            for r in overlap:
                ratios = [f"{x:.3f}" if x is not None else "-" for x in (r["union_per_row"], r["union_per_candidate"])]
                print(f"needle: layer {r['layer']:>3} tile {r['tile']:>5}: union / rows {ratios[0]}  "
                      f"union / candidates {ratios[1]}", flush=True)
        results = evaluate(args, model, probes, device)
        if rank0:
            (args.out / "needle.json").write_text(json.dumps(results, indent=1))
            title = f"{args.load} (iteration {loaded}): {kind}, {attention}"
            if heatmap(results, args.out / "needle.png", title):
                print(f"needle: wrote {args.out / 'needle.json'} and {args.out / 'needle.png'}")
            else:
                print(f"needle: wrote {args.out / 'needle.json'}; for the heatmap needle.png install matplotlib "
                      "(pip install 'moba-megatron[plot]')")
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
