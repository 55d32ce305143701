"""CPU demo: MoBA forward and backward on one long sequence, checked against the dense reference,
with a picture of which blocks the queries selected.

A "needle" is planted: the keys of one early block share a direction with the queries of the
last quarter of the sequence, so those queries should route to it (a bright column in the picture).

    python -m moba_megatron.demo [--config configs/demo-cpu.yaml] [--seq-len 8192 ...]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import yaml

from moba_megatron import moba_attn_varlen
from moba_megatron.ops.moba import moba_attn_varlen_reference
from moba_megatron.ops.moba.gating import block_key_sums, select_blocks
from moba_megatron.ops.moba.layout import block_layout

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo-cpu.yaml"
FIELDS = {
    "seq_len": int,
    "moba_chunk_size": int,
    "moba_topk": int,
    "num_heads": int,
    "num_kv_heads": int,
    "head_dim": int,
    "seed": int,
}
SHADES = " .:-=+*%@"


def load_config(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    for name, kind in FIELDS.items():
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=None)
    args = parser.parse_args(argv)
    config = yaml.safe_load(args.config.read_text()) or {}
    unknown = sorted(set(config) - set(FIELDS))
    if unknown:
        parser.error(f"unknown key(s) {unknown} in {args.config}; known: {sorted(FIELDS)}")
    for name in FIELDS:
        if getattr(args, name) is not None:
            config[name] = getattr(args, name)
    missing = sorted(set(FIELDS) - set(config))
    if missing:
        parser.error(f"missing key(s) {missing}: set them in {args.config} or as flags")
    return config


def make_inputs(cfg: dict):
    g = torch.Generator().manual_seed(cfg["seed"])
    t, h, hkv, d, c = cfg["seq_len"], cfg["num_heads"], cfg["num_kv_heads"], cfg["head_dim"], cfg["moba_chunk_size"]
    q = torch.randn(t, h, d, generator=g)
    k = torch.randn(t, hkv, d, generator=g)
    v = torch.randn(t, hkv, d, generator=g)
    needle = min(2, max(0, t // c - 2))  # an early block
    direction = torch.randn(d, generator=g)
    direction /= direction.norm()
    k[needle * c : (needle + 1) * c] += direction
    q[3 * t // 4 :] += direction
    return q, k, v, needle


def selection_picture(q, k, cfg) -> str:
    t, c, topk = cfg["seq_len"], cfg["moba_chunk_size"], cfg["moba_topk"]
    layout = block_layout((0, t), c, q.device)
    sel = select_blocks(q, block_key_sums(k, layout), layout, max(0, min(topk - 1, layout.max_candidates)))
    nb = layout.num_blocks
    hits = torch.zeros(nb, nb)
    counts = torch.zeros(nb)
    for qb in range(nb):
        rows = sel[qb * c : (qb + 1) * c]  # [n, H, slots]
        counts[qb] = rows.shape[0] * rows.shape[1]
        chosen = rows[rows >= 0].long()
        hits[qb] += torch.bincount(chosen, minlength=nb).float()
    lines = ["query block -> share of (query, head) pairs selecting each key block; # = own block"]
    lines.append("      " + "".join(str(j % 10) for j in range(nb)))
    for qb in range(nb):
        row = []
        for kb in range(nb):
            if kb == qb:
                row.append("#")
            elif kb > qb:
                row.append(" ")
            else:
                share = float(hits[qb, kb] / counts[qb])
                row.append(SHADES[min(len(SHADES) - 1, int(share * (len(SHADES) - 1) + 0.999))] if share else "·")
        lines.append(f"{qb:>5} " + "".join(row))
    return "\n".join(lines)


def main(argv=None) -> None:
    cfg = load_config(argv)
    torch.manual_seed(cfg["seed"])
    q, k, v, needle = make_inputs(cfg)
    t, c, topk = cfg["seq_len"], cfg["moba_chunk_size"], cfg["moba_topk"]
    cu = torch.tensor([0, t], dtype=torch.int32)
    dout = torch.randn_like(q)
    print(
        f"MoBA demo: {t} tokens, {cfg['num_heads']} query / {cfg['num_kv_heads']} kv heads, head_dim "
        f"{cfg['head_dim']}, block {c}, top-k {topk} (own block included), fp32 on CPU"
    )

    results = {}
    for name, fn in (
        ("moba", lambda a, b, x: moba_attn_varlen(a, b, x, cu, t, c, topk)),
        ("dense reference", lambda a, b, x: moba_attn_varlen_reference(a, b, x, cu, c, topk)),
    ):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        start = time.perf_counter()
        out = fn(*leaves)
        out.backward(dout)
        results[name] = (out.detach(), [x.grad for x in leaves], time.perf_counter() - start)
        print(f"  {name:<16} forward+backward {results[name][2]:6.2f} s")

    (out, grads, _), (ref, ref_grads, _) = results["moba"], results["dense reference"]
    worst = max((a - b).abs().max().item() for a, b in zip([out, *grads], [ref, *ref_grads]))
    print(
        "  max |moba - reference|: "
        + ", ".join(
            f"{n} {(a - b).abs().max().item():.1e}"
            for n, a, b in zip(["out", "dq", "dk", "dv"], [out, *grads], [ref, *ref_grads])
        )
    )
    print(f"  agreement: {'OK' if worst < 1e-4 else 'MISMATCH'} (tolerance 1e-4)")
    nb = -(-t // c)
    attended = sum(
        min(b, topk - 1) * c * min(c, t - b * c) + min(c, t - b * c) * (min(c, t - b * c) + 1) // 2 for b in range(nb)
    )
    print(f"  keys attended: {attended / (t * (t + 1) / 2):.1%} of causal attention\n")
    print(selection_picture(q, k, cfg))
    print(f"\nThe queries of the last quarter share a direction with block {needle}'s keys: column {needle} lights up.")
    if worst >= 1e-4:
        raise SystemExit("MoBA disagrees with the dense reference")


if __name__ == "__main__":
    main()
