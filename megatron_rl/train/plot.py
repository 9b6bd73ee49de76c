"""`megatron-rl plot RUN_DIR`: reward, accuracy, entropy and response length against step, as a PNG."""

from __future__ import annotations

from pathlib import Path

from megatron_rl.train.metrics import read_metrics

PANELS = [
    ("reward_mean", "reward (train batch)"),
    ("heldout_accuracy", "held-out accuracy"),
    ("entropy_mean", "entropy"),
    ("response_length_mean", "response length (tokens)"),
]


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    out = Path(out) if out else Path(run_dir) / "metrics.png"
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (key, title) in zip(axes.flat, PANELS, strict=True):
        points = [(r["step"], r[key]) for r in records if key in r]
        if key == "heldout_accuracy" and not points:  # no periodic eval: fall back to the batch accuracy
            key, title = "accuracy", "accuracy (train batch)"
            points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            ax.plot(*zip(*points, strict=True), marker="." if len(points) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(f"megatron-rl: {Path(run_dir).name}")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
