"""Per-step metrics to a JSONL file, TensorBoard, optional Weights & Biases, and a tqdm progress bar."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from tqdm import tqdm

log = logging.getLogger(__name__)


class MetricsLogger:
    def __init__(
        self, run_dir: Path, total_steps: int, start_step: int, tensorboard: bool, wandb_project, config
    ):
        self.path = run_dir / "metrics.jsonl"
        self.file = self.path.open("a")
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        self.wandb = None
        if wandb_project:
            try:
                import wandb

                self.wandb = wandb.init(
                    project=wandb_project, dir=str(run_dir), config=config, resume="allow"
                )
            except ImportError:
                log.warning("wandb_project is set but wandb is not installed; skipping W&B logging")
        # A live bar on a terminal; in a batch log (Slurm, NeMo-Run) one plain line per step instead.
        self.interactive = sys.stderr.isatty()
        self.total_steps = total_steps
        self.started = time.perf_counter()
        self.start_step = start_step
        self.bar = tqdm(
            total=total_steps,
            initial=start_step,
            desc="RL",
            unit="step",
            dynamic_ncols=True,
            disable=not self.interactive,
        )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, **metrics}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for key, value in metrics.items():
            if self.tb is not None and isinstance(value, (int, float)):
                self.tb.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        self.bar.set_postfix(
            reward=f"{metrics.get('reward_mean', 0):.3f}",
            len=f"{metrics.get('response_length_mean', 0):.0f}",
            ent=f"{metrics.get('entropy_mean', 0):.2f}",
            T=f"{metrics.get('temperature', 0):.2f}",
        )
        self.bar.update(1)
        if not self.interactive:
            done = step - self.start_step
            eta_min = (time.perf_counter() - self.started) / max(1, done) * (self.total_steps - step) / 60
            log.info(
                "step %d/%d reward %.3f accuracy %.3f length %.0f entropy %.3f T %.3f %.1fs/step ETA %.1f min",
                step,
                self.total_steps,
                metrics.get("reward_mean", 0.0),
                metrics.get("accuracy", 0.0),
                metrics.get("response_length_mean", 0.0),
                metrics.get("entropy_mean", 0.0),
                metrics.get("temperature", 0.0),
                metrics.get("time_step_s", 0.0),
                eta_min,
            )

    def close(self) -> None:
        self.bar.close()
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
