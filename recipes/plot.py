"""Render loss curves and a heatmap of expert load over steps from a run's metrics.jsonl.

    python recipes/plot.py outputs/tiny/metrics.jsonl            # writes outputs/tiny/metrics.png

Needs matplotlib (``pip install -e ".[plot]"``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def read_metrics(path: Path) -> list[dict]:
    """Records by step; when a resumed run logged a step again, the last record wins."""
    by_step: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)]


def plot(metrics_path: Path, out_path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    records = [r for r in read_metrics(metrics_path) if "loss" in r]  # not the skipped steps' records
    if not records:
        raise ValueError(f"plot: {metrics_path} has no records; run recipes/train.py first.")
    steps = [r["step"] for r in records]
    layers = list(records[-1]["expert_utilization"])
    fig, axes = plt.subplots(1 + len(layers), 1, figsize=(10, 3.2 * (1 + len(layers))), squeeze=False)
    ax = axes[0][0]
    ax.plot(steps, [r["loss"] for r in records], label="train loss")
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/byte)")
    ax.legend()
    ax.grid(alpha=0.3)
    for i, layer in enumerate(layers, start=1):
        load = np.array([r["expert_utilization"][layer] for r in records]).T  # [E, steps]
        a = axes[i][0]
        im = a.imshow(load, aspect="auto", interpolation="nearest", cmap="viridis",
                      extent=(steps[0], steps[-1], load.shape[0] - 0.5, -0.5))
        a.set_title(f"{layer}: fraction of routed tokens per expert")
        a.set_xlabel("step")
        a.set_ylabel("expert")
        fig.colorbar(im, ax=a)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("metrics", type=Path, help="path to metrics.jsonl")
    p.add_argument("--out", type=Path, help="PNG path (default: next to metrics.jsonl)")
    args = p.parse_args()
    if not args.metrics.exists() or args.metrics.is_dir():  # (a pipe, e.g. <(cat ...), is fine)
        p.error(f"{args.metrics} is not a file; pass a run's metrics.jsonl (e.g. outputs/tiny/metrics.jsonl)")
    out = plot(args.metrics, args.out or args.metrics.with_suffix(".png"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
