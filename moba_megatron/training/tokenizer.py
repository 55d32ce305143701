"""A byte-level tokenizer: UTF-8 bytes are tokens 0..255, end-of-document is 256.

It needs no download, so indexed datasets can be built and trained on anywhere; the model's
``--vocab-size`` must be at least its 257 tokens."""

from __future__ import annotations


class ByteTokenizer:
    vocab_size = 257
    eod = 256
    pad = 256
    # megatron-core's datasets hash the tokenizer's identity into their index cache names
    unique_identifiers = {"class": "ByteTokenizer", "vocab_size": 257}

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def detokenize(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


TOKENIZERS = {"ByteTokenizer": ByteTokenizer}
