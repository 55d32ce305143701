"""Loss against step for moba-pretrain logs, one curve per log, as a PNG (needs matplotlib).

    python benchmarks/plot_losses.py moba.log full.log --out benchmarks/loss_125m_32k.png
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

LINE = re.compile(r"iteration\s+(\d+)/\s*\d+ .*\| lm loss: (\S+) \|.*\| tokens/s: (\d+)")


def read(log: Path) -> list[tuple[int, float, int]]:
    return [(int(i), float(loss), int(tps)) for i, loss, tps in LINE.findall(log.read_text())]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("logs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--title", default="125M GPT, 32K context, synthetic retrieval")
    args = parser.parse_args()
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("plot_losses.py needs matplotlib: pip install matplotlib")
    fig, ax = plt.subplots(figsize=(7, 4))
    for log in args.logs:
        points = read(log)
        if not points:
            raise SystemExit(f"no 'iteration ... | lm loss' lines in {log}")
        ax.plot([p[0] for p in points], [p[1] for p in points], label=log.stem)
    ax.set_xlabel("step")
    ax.set_ylabel("lm loss")
    ax.set_title(args.title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
