"""Tokenizers through megatron-core's ``megatron.core.tokenizers``, by Megatron-LM's names.

- ``HuggingFaceTokenizer`` with ``--tokenizer-model DIR``: a local folder holding ``tokenizer.json``
  (read offline; the end-of-document token is its ``eos_token``).
- ``ByteTokenizer``: UTF-8 bytes, 256 tokens, byte 0 ends a document (megatron-core's byte-level
  tokenizer; no files needed).
- ``NullTokenizer``: the text is whitespace-separated token ids below ``--vocab-size``; the last id
  ends a document.

The model's vocabulary follows Megatron-LM: the tokenizer's size (or a larger ``--vocab-size``),
padded up to a multiple of ``--make-vocab-size-divisible-by`` x the tensor-parallel size.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

TOKENIZER_TYPES = ("HuggingFaceTokenizer", "ByteTokenizer", "NullTokenizer")


def build_tokenizer(tokenizer_type: str, tokenizer_model: str | None = None, vocab_size: int | None = None):
    """A megatron-core tokenizer; ValueError naming the flag and the fix for bad input."""
    from megatron.core.tokenizers import MegatronTokenizer

    if tokenizer_type not in TOKENIZER_TYPES:
        raise ValueError(f"--tokenizer-type {tokenizer_type!r} is not supported; choose one of {list(TOKENIZER_TYPES)}")
    if tokenizer_type == "ByteTokenizer":
        return MegatronTokenizer.from_pretrained(metadata_path={"library": "byte-level"}, vocab_size=256)
    if tokenizer_type == "NullTokenizer":
        if vocab_size is None:
            raise ValueError("--tokenizer-type NullTokenizer needs --vocab-size (its ids are the text's numbers)")
        return MegatronTokenizer.from_pretrained(metadata_path={"library": "null-text"}, vocab_size=vocab_size)
    if tokenizer_model is None:
        raise ValueError(
            "--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model DIR, a local folder with tokenizer.json"
        )
    folder = Path(tokenizer_model)
    if not folder.is_dir():
        raise ValueError(f"--tokenizer-model {tokenizer_model}: no such folder")
    if not (folder / "tokenizer.json").is_file():
        raise ValueError(f"--tokenizer-model {tokenizer_model}: no tokenizer.json there "
                         "(save one with tokenizer.save_pretrained(DIR))")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder: never ask the hub
    tokenizer = MegatronTokenizer.from_pretrained(tokenizer_path=str(folder), metadata_path={"library": "huggingface"})
    if tokenizer.eod is None:
        raise ValueError(f"--tokenizer-model {tokenizer_model}: the tokenizer has no eos_token to end documents with; "
                         "set eos_token in its tokenizer_config.json")
    return tokenizer


def padded_vocab_size(tokens: int, vocab_size: int | None, divisible_by: int, tensor_parallel: int,
                      what: str = "the tokenizer") -> int:
    """Megatron-LM's padded vocabulary: ``max(tokens, vocab_size)`` rounded up to a multiple of
    ``divisible_by x tensor_parallel``; an explicit ``vocab_size`` below ``tokens`` is an error."""
    if vocab_size is not None and vocab_size < tokens:
        raise ValueError(f"--vocab-size {vocab_size} is smaller than {what}'s {tokens} tokens; "
                         f"leave it out (it follows the tokenizer) or pass at least {tokens}")
    multiple = divisible_by * tensor_parallel
    return math.ceil(max(tokens, vocab_size or 0) / multiple) * multiple


def set_padded_vocab(args, tokens: int, what: str = "the tokenizer") -> None:
    """The job's vocabulary from its flags: ``args.vocab_tokens`` (the larger of ``tokens`` and
    ``--vocab-size``) and ``args.padded_vocab_size`` (``padded_vocab_size`` at the job's TP)."""
    args.padded_vocab_size = padded_vocab_size(tokens, args.vocab_size, args.make_vocab_size_divisible_by,
                                               args.tensor_model_parallel_size, what)
    args.vocab_tokens = max(tokens, args.vocab_size or 0)
