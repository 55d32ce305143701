"""Turn a JSONL corpus (one JSON object per line) into Megatron indexed datasets, with Megatron-LM's
flags and output names (``tools/preprocess_data.py`` there):

    python -m moba_megatron.tools.preprocess_data --input corpus.jsonl --output-prefix data/corpus \\
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model TOKENIZER_DIR --append-eod --workers 4
    # writes data/corpus_text_document.bin/.idx; train with --data-path data/corpus_text_document

Each ``--json-keys`` key gets its own dataset ``PREFIX_KEY_document``. A file whose name does not end
in ``.json``/``.jsonl`` is read as plain text, one document per line (key ``text``). Documents are
tokenized by ``--workers`` processes, in order.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..training.quiet import hide_known_warnings
from ..training.tokenizer import TOKENIZER_TYPES, build_tokenizer

_tokenizer = None  # per worker process


def _start_worker(tokenizer_args) -> None:
    global _tokenizer
    hide_known_warnings()
    _tokenizer = build_tokenizer(*tokenizer_args)


def _encode(job):
    """``(line number, line, keys, append_eod, as_json)`` -> ``(line number, {key: ids}, bytes)``,
    or ``(line number, error message, 0)`` for a line that is not a JSON object with the keys."""
    number, line, keys, append_eod, as_json = job
    if as_json:
        try:
            record = json.loads(line)
            texts = {key: record[key] for key in keys}
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            return number, f"not a JSON object with the key(s) {keys} ({type(e).__name__}: {e})", 0
    else:
        texts = {keys[0]: line.rstrip("\n")}
    ids = {}
    for key, text in texts.items():
        ids[key] = _tokenizer.tokenize(text) + ([_tokenizer.eod] if append_eod else [])
    return number, ids, len(line)


def _lines(path: Path):
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                yield number, line


class _Progress:
    """tqdm's bar where tqdm is installed (it comes with the ``[hf]`` extra), else a Megatron-style
    log line every ``interval`` documents."""

    def __init__(self, total_bytes: int, interval: int):
        self.interval, self.start, self.docs, self.bytes = interval, time.time(), 0, 0
        try:
            from tqdm import tqdm

            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", file=sys.stderr)
        except ImportError:
            self.bar = None

    def update(self, nbytes: int) -> None:
        self.docs += 1
        self.bytes += nbytes
        if self.bar is not None:
            self.bar.update(nbytes)
        elif self.docs % self.interval == 0:
            elapsed = max(time.time() - self.start, 1e-9)
            print(f"Processed {self.docs} documents ({self.docs / elapsed:.1f} docs/s, "
                  f"{self.bytes / elapsed / 2**20:.2f} MB/s).", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def preprocess(input_path: Path, output_prefix: str, keys: list[str], tokenizer_type: str = "ByteTokenizer",
               tokenizer_model: str | None = None, vocab_size: int | None = None, append_eod: bool = False,
               workers: int = 1, log_interval: int = 10000) -> dict[str, int]:
    """Writes ``{output_prefix}_{key}_document.bin/.idx`` per key; returns documents written per key."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    tokenizer_args = (tokenizer_type, tokenizer_model, vocab_size)
    tokenizer = build_tokenizer(*tokenizer_args)  # fails here, once, on bad tokenizer flags
    Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if tokenizer.vocab_size < 65500 else np.int32
    names = {key: f"{output_prefix}_{key}_document" for key in keys}
    builders = {key: IndexedDatasetBuilder(f"{name}.bin", dtype=dtype) for key, name in names.items()}
    as_json = input_path.suffix in (".json", ".jsonl")
    jobs = ((number, line, keys, append_eod, as_json) for number, line in _lines(input_path))
    progress = _Progress(input_path.stat().st_size, log_interval)
    counts = dict.fromkeys(keys, 0)
    if workers > 1:
        pool = multiprocessing.get_context("spawn").Pool(workers, _start_worker, (tokenizer_args,))
        results = pool.imap(_encode, jobs, chunksize=64)
    else:
        pool = None
        global _tokenizer
        _tokenizer = tokenizer
        results = map(_encode, jobs)
    try:
        for number, ids, nbytes in results:
            if isinstance(ids, str):
                raise ValueError(f"{input_path}:{number}: {ids}")
            for key, doc in ids.items():
                if doc:
                    builders[key].add_document(torch.tensor(doc, dtype=torch.int64), [len(doc)])
                    counts[key] += 1
            progress.update(nbytes)
    finally:
        progress.close()
        if pool is not None:
            pool.terminate()
    if not any(counts.values()):
        raise ValueError(f"{input_path}: no documents")
    for key, name in names.items():
        builders[key].finalize(f"{name}.idx")
    return counts


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("input data")
    group.add_argument("--input", type=Path, required=True, help="JSONL file (or plain text, one document a line)")
    group.add_argument("--json-keys", nargs="+", default=["text"], help="keys of the documents to extract")
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", default="ByteTokenizer", choices=TOKENIZER_TYPES)
    group.add_argument("--tokenizer-model", default=None, help="HuggingFaceTokenizer: local folder with tokenizer.json")
    group.add_argument("--vocab-size", type=int, default=None, help="NullTokenizer: its vocabulary size")
    group.add_argument("--append-eod", action="store_true", help="end every document with the end-of-document token")
    group = parser.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True, help="writes PREFIX_KEY_document.bin/.idx")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    group.add_argument(
        "--log-interval", type=int, default=10000, help="documents between progress lines (without tqdm)"
    )
    args = parser.parse_args(argv)
    if not args.input.is_file():
        parser.error(f"--input {args.input}: no such file")
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    hide_known_warnings()
    try:
        counts = preprocess(args.input, args.output_prefix, args.json_keys, args.tokenizer_type, args.tokenizer_model,
                            args.vocab_size, args.append_eod, args.workers, args.log_interval)
    except ValueError as e:
        parser.error(str(e))
    for key, n in counts.items():
        print(f"wrote {n} documents to {args.output_prefix}_{key}_document.bin/.idx")


if __name__ == "__main__":
    main()
