"""Compare parallel_worker outputs: ``python -m tests.megatron.compare_tp REF.pt OTHER.pt [--rtol 0.02]``.

Prints the loss of each and, per parameter, the relative error ||g - g_ref|| / ||g_ref|| of its
gradient; exits non-zero if any exceeds ``--rtol`` (loss: ``--loss-atol``)."""

import argparse
import sys

import torch


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("reference")
    parser.add_argument("other")
    parser.add_argument("--rtol", type=float, default=2e-2)
    parser.add_argument("--loss-atol", type=float, default=5e-3)
    parser.add_argument("--skip", action="append", default=[])
    args = parser.parse_args()
    ref, other = torch.load(args.reference), torch.load(args.other)
    ok = abs(float(ref["loss"]) - float(other["loss"])) <= args.loss_atol
    print(f"loss {float(ref['loss']):.6f} vs {float(other['loss']):.6f} {'ok' if ok else 'MISMATCH'}")
    worst = 0.0
    for name, g in ref["grads"].items():
        if any(s in name for s in args.skip):
            continue
        h = other["grads"][name]
        if g.shape != h.shape:
            print(f"{name}: shape {tuple(h.shape)} vs {tuple(g.shape)}")
            ok = False
            continue
        err = float((h - g).norm() / g.norm().clamp_min(1e-12))
        worst = max(worst, err)
        ok &= err <= args.rtol
    print(f"{len(ref['grads'])} gradients, worst relative error {worst:.2e} (tolerance {args.rtol}) "
          f"{'ok' if ok else 'MISMATCH'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
