"""Which dataset row each training data position holds when easy prompts leave at epoch boundaries.

AceReason-Nemotron's code stage 2 (arXiv 2505.16400) removes, at the end of every epoch, the prompts whose
every rollout in that epoch was correct: they carry no learning signal any more and only cost generation and
sandbox time. `data.drop_solved_each_epoch` turns this on (off: epochs cycle through the file in order,
`PromptDataset.train_problem`).

Epoch 0 holds every row in file order; each later epoch holds the rows of the one before, in the same order,
minus those solved by every sample there. Data positions count on across epochs (the checkpoint's
data_position), so position p lies in the epoch whose span [start, start + rows) contains it. An epoch's rows
are chosen only once every prompt of the epoch before has been scored: the rollout loop stops a round at the
epoch's end (`rollouts.next_problems`) and records each scored group (`record`) before asking for more.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from megatron_rl.data.dataset import DatasetError

log = logging.getLogger(__name__)


class AllPromptsSolved(DatasetError):
    """Every remaining training prompt was solved by all its samples: removing them would leave none (a
    DatasetError: `megatron-rl train` prints it as one line)."""


class SolvedPromptRemoval:
    """The epoch-wise order of `size` dataset rows, with the rows solved by every sample leaving at each epoch
    boundary. Its `state()` goes into the checkpoint's loop state; `SolvedPromptRemoval(size, state)` resumes
    it, so a resumed run draws the same rows as one that never stopped."""

    def __init__(self, size: int, state: dict | None = None, start: int = 0) -> None:
        """Without `state`, epoch 0 begins at data position `start` (a run that turns the option on when
        resumed starts its first epoch where it stands)."""
        if size < 1:
            raise ValueError("a dataset of at least one row")
        self.size = size
        if state is None:
            self.epoch, self.start = 0, start
            self.rows: list[int] = list(range(size))
            self.solved: set[int] = set()
            return
        if state.get("size") != size:
            raise DatasetError(
                f"the checkpoint's easy-prompt removal state is for a dataset of {state.get('size')} rows, this "
                f"run's has {size}: resume with the same data.train_path"
            )
        self.epoch, self.start = state["epoch"], state["start"]
        removed = set(state["removed"])
        self.rows = [row for row in range(size) if row not in removed]
        self.solved = set(state["solved"])

    @property
    def end(self) -> int:
        """The first data position past the current epoch."""
        return self.start + len(self.rows)

    def row(self, position: int) -> int:
        """The dataset row at `position`, which must lie in the current epoch."""
        if not self.start <= position < self.end:
            raise IndexError(
                f"data position {position} is outside epoch {self.epoch} (positions {self.start}..{self.end - 1})"
            )
        return self.rows[position - self.start]

    def record(self, row: int, rewards: Sequence[float]) -> None:
        """One scored group of `row` in the current epoch: solved when every sample is correct (reward > 0.5,
        as the accuracy metric counts; the rewards are binary)."""
        if rewards and all(r > 0.5 for r in rewards):
            self.solved.add(row)

    def next_epoch(self) -> None:
        """Start the next epoch without the rows every sample solved in this one. Raises AllPromptsSolved when
        that would leave none: the stage has nothing left to learn from its data."""
        keep = [row for row in self.rows if row not in self.solved]
        if not keep:
            raise AllPromptsSolved(
                f"data.drop_solved_each_epoch: every one of the {len(self.rows)} remaining training prompts was "
                f"solved by all its samples in epoch {self.epoch}, so none would remain for epoch "
                f"{self.epoch + 1}; end the stage earlier (run.steps) or turn the option off"
            )
        log.info(
            "epoch %d ends: %d prompts solved by every sample leave, %d of %d remain for epoch %d",
            self.epoch,
            len(self.rows) - len(keep),
            len(keep),
            self.size,
            self.epoch + 1,
        )
        self.start, self.epoch = self.end, self.epoch + 1
        self.rows, self.solved = keep, set()

    def state(self) -> dict:
        """Plain data for the checkpoint's loop state."""
        kept = set(self.rows)
        return {
            "size": self.size,
            "epoch": self.epoch,
            "start": self.start,
            "removed": [row for row in range(self.size) if row not in kept],
            "solved": sorted(self.solved),
        }

    def stats(self) -> dict[str, float]:
        """For the step's metrics: the epoch and how many prompts remain in it."""
        return {"epoch": float(self.epoch), "prompts_remaining": float(len(self.rows))}
