"""The known startup messages of megatron-core without Transformer Engine and apex (every CPU run,
and GPU machines without them): about 25 lines before the job's first, each saying a fused path is
off. They are hidden, and the job says it once; every other warning still shows.

Installed before megatron-core is imported (``moba_megatron.pretrain`` does it first thing), also
in the processes dist_checkpointing starts, which import that module again."""

from __future__ import annotations

import importlib.util
import logging
import re
import warnings

# warnings.warn messages (their start)
_WARNINGS = (
    "Transformer Engine and Apex are not installed",
    "Apex is not installed",
    "absl.logging is not installed",
    "full scope is deprecated",
)
# logger name -> message start
_LOG_RECORDS = {
    "megatron.core.models.gpt.gpt_model": "GPTModel IS DEPRECATED",
    "megatron.core.dist_checkpointing.strategies.torch": "MCore's async save is deprecated",
    "torch.utils.cpp_extension": "No CUDA runtime is found",
}


def fused_paths_missing() -> bool:
    return not any(importlib.util.find_spec(name) is not None for name in ("transformer_engine", "apex"))


def hide_known_warnings() -> None:
    if not fused_paths_missing():
        return
    for message in _WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(message), category=UserWarning)
    for name, message in _LOG_RECORDS.items():
        logging.getLogger(name).addFilter(lambda record, m=message: not str(record.msg).startswith(m))


SUMMARY = ("no Transformer Engine or apex: megatron-core runs its torch optimizer, torch norms and "
           "unfused kernels (its warnings about that are hidden)")
