"""Turn a JSONL (one JSON object per line) or plain-text file into a Megatron indexed dataset.

    python -m moba_megatron.tools.preprocess_data --input corpus.jsonl --output-prefix data/corpus
    # writes data/corpus.bin and data/corpus.idx; train with --data-path data/corpus

Plain text (any other extension) is one document per line. Every document ends with the
tokenizer's end-of-document token.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from ..training.tokenizer import TOKENIZERS


def documents(path: Path, json_key: str):
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                try:
                    yield json.loads(line)[json_key]
                except (json.JSONDecodeError, KeyError) as e:
                    raise SystemExit(f"{path}:{number}: not a JSON object with key {json_key!r} ({e})")
            else:
                yield line.rstrip("\n")


def preprocess(input_path: Path, output_prefix: Path, json_key: str = "text", tokenizer: str = "ByteTokenizer") -> int:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    tok = TOKENIZERS[tokenizer]()
    output_prefix.parent.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if tok.vocab_size < 65500 else np.int32
    builder = IndexedDatasetBuilder(f"{output_prefix}.bin", dtype=dtype)
    count = 0
    for text in documents(input_path, json_key):
        ids = tok.tokenize(text) + [tok.eod]
        builder.add_document(torch.tensor(ids, dtype=torch.int64), [len(ids)])
        count += 1
    if count == 0:
        raise SystemExit(f"{input_path}: no documents")
    builder.finalize(f"{output_prefix}.idx")
    return count


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, required=True)
    parser.add_argument("--output-prefix", type=Path, required=True)
    parser.add_argument("--json-keys", default="text", help="the JSON key holding each document's text")
    parser.add_argument("--tokenizer-type", default="ByteTokenizer", choices=sorted(TOKENIZERS))
    args = parser.parse_args(argv)
    if not args.input.is_file():
        parser.error(f"--input {args.input}: no such file")
    n = preprocess(args.input, args.output_prefix, args.json_keys, args.tokenizer_type)
    print(f"wrote {n} documents to {args.output_prefix}.bin/.idx")


if __name__ == "__main__":
    main()
