"""A picture of expert load over training steps, from a run's metrics.jsonl.

    python -m benchmarks.plot_load runs/tiny            # writes runs/tiny/expert_load.png

One panel per MoE layer: each expert's share of the kept assignments at each
step (a heat map; a balanced layer is a flat colour at 1 / E), and above the
panels the max / mean load of every layer. matplotlib is an optional
dependency (`pip install -e '.[plot]'`); without it nothing is drawn. The
trainer does not need it: it writes its own expert_load.png with
launch/expert_load.py (standard library only), which this command overwrites.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def write_png(metrics_path: Path, png_path: Path) -> str:
    """Draw `png_path` from `metrics_path`; returns a line saying what was done."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"no {png_path.name}: matplotlib is not installed (pip install -e '.[plot]')"
    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    rows = [row for row in rows if row.get("expert_share")]
    if not rows:
        return f"no {png_path.name}: {metrics_path} holds no per-expert load (a dense model?)"
    steps = [row["step"] for row in rows]
    num_layers = len(rows[0]["expert_share"])
    fig, axes = plt.subplots(
        num_layers + 1, 1, figsize=(9, 1.6 + 1.6 * num_layers), sharex=True, squeeze=False
    )
    top = axes[0][0]
    for layer in range(num_layers):
        top.plot(steps, [row["expert_load_per_layer"][layer] for row in rows], label=f"layer {layer}")
    top.set_ylabel("max / mean")
    top.legend(fontsize="x-small", ncol=min(num_layers, 4))
    top.set_title(f"expert load over steps: {Path(metrics_path).parent.name}")
    for layer in range(num_layers):
        ax = axes[layer + 1][0]
        share = [
            [row["expert_share"][layer][e] for row in rows]
            for e in range(len(rows[0]["expert_share"][layer]))
        ]
        image = ax.imshow(
            share,
            aspect="auto",
            origin="lower",
            interpolation="nearest",
            extent=(steps[0], steps[-1], -0.5, len(share) - 0.5),
        )
        ax.set_ylabel(f"layer {layer}\nexpert")
        fig.colorbar(image, ax=ax, label="share")
    axes[-1][0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return f"wrote {png_path}"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    out_dir = Path(argv[0])
    print(write_png(out_dir / "metrics.jsonl", out_dir / "expert_load.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
