"""`megatron-rl recipe RECIPE.yaml`: RL stages in order, each starting from the previous one's final model, with
hard-prompt filtering between them.

A recipe file:

    name: tiny                     # runs go to RUN.OUTPUT_DIR/NAME/<step name>
    steps:
      - stage: math                # an RL stage: `megatron-rl train` with this config and overrides
        config: configs/tiny_math.yaml
        overrides: [run.steps=40]
      - filter: hard               # hard-prompt filtering: `megatron-rl curate --difficulty` with the model
        data: train.jsonl          #   so far, on this file (default: the next stage's data.train_path) ...
        k: 8
        max_pass_rate: 0.375
        drop_unsolved: true
      - stage: math_hard           # ... the next stage trains on what it kept
        config: configs/tiny_math.yaml

Each stage after the first starts from the previous stage's RUN_DIR/final_model (model.path), unless its
overrides set model.path; the first from the recipe's `model:` when given. `data: {math: FILE, code: FILE}`
gives each stage the training file of its domain (data.reward), unless a filter step before it decides.
${VAR} in `model:`, `data:` and a filter's `data` comes from the environment. With `fit_max_num_seqs: true`
each stage runs as many sequences per vLLM engine as `megatron-rl plan` finds its KV cache holds. Overrides given on the command line apply to every stage (e.g.
run.output_dir=...). A step that finished (its result.json exists) is never run again; a stage that started
and did not finish is continued from its latest checkpoint with --resume, and refused without it. The steps
run as subprocesses (`python -m megatron_rl.cli train|curate`; under `--nproc N`, train through torchrun),
so each gets a fresh process, as each job of a cluster recipe does. The last stdout line is one JSON object:
{"stages": [{"name", "start_accuracy", "end_accuracy", "minutes"}, ...], "filtered": {"kept", "dropped"},
"minutes"}, also written to RUN.OUTPUT_DIR/NAME/result.json.

Every step's command is planned before any runs (`RecipeRun.plan`: paths are known before they exist), so the
cluster launchers run the same recipe one job per step: slurm/recipe.sh runs `next_step()` in each job and submits
the next one; launchers/recipe.py submits one NeMo-Run task per unfinished step. `--step NAME` runs one step
(refused until the steps before it have finished).
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from megatron_rl.config import ConfigError, load_config

log = logging.getLogger("megatron_rl")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FilterStep(_Strict):
    """Hard-prompt filtering with the model trained so far (data/curate.py with a Difficulty)."""

    filter: str = Field(description="the step's name")
    data: str | None = None  # rows to filter; default: the next stage's data.train_path
    # The tiny stand-in when the stages train on the synthetic task: its first N training problems (and its
    # held-out set, for the next stage's eval) are written as files and filtered.
    synthetic: int | None = Field(None, ge=1)
    k: int = Field(8, ge=1)
    temperature: float = Field(0.6, ge=0)
    max_pass_rate: float | None = Field(None, ge=0, le=1)
    drop_unsolved: bool = False

    @model_validator(mode="after")
    def _one_source(self) -> FilterStep:
        if self.data is not None and self.synthetic is not None:
            raise ValueError("give 'data' or 'synthetic', not both")
        return self


class StageStep(_Strict):
    stage: str = Field(description="the stage's name")
    config: str
    overrides: list[str] = Field(default_factory=list)


class Recipe(_Strict):
    name: str
    steps: list[StageStep | FilterStep]
    model: str | None = None  # the first stage's model.path (${VAR}: from the environment)
    data: dict[Literal["math", "code"], str] = Field(default_factory=dict)  # training file per stage domain
    fit_max_num_seqs: bool = False  # each stage's rollout.max_num_seqs from `megatron-rl plan` (what fits)

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        names = [s.stage if isinstance(s, StageStep) else s.filter for s in self.steps]
        if len(set(names)) != len(names):
            raise ValueError(f"step names must be unique, got {names}")
        if not self.steps or not isinstance(self.steps[0], StageStep):
            raise ValueError("the first step must be a stage (a filter needs a model trained before it)")
        for i, step in enumerate(self.steps):
            if isinstance(step, FilterStep) and (
                i + 1 == len(self.steps) or not isinstance(self.steps[i + 1], StageStep)
            ):
                raise ValueError(
                    f"filter '{step.filter}' must be followed by a stage, which trains on what it keeps"
                )
        return self


def load_recipe(path: Path) -> Recipe:
    if not path.is_file():
        raise ConfigError(f"recipe file '{path}' does not exist")
    try:
        tree = yaml.safe_load(path.read_text())
        return Recipe.model_validate(tree)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise ConfigError(f"{path}: recipe key '{where}': {first['msg']}") from None


def _expand(value: str, what: str) -> str:
    """`value` with ${VAR} and $VAR taken from the environment; an unset one is an error naming it."""
    expanded = os.path.expandvars(value)
    unset = re.search(r"\$\{?(\w+)", expanded)
    if unset:
        raise ConfigError(f"recipe {what}: environment variable {unset.group(1)} is not set")
    return expanded


def _resolve(path: str, base: Path) -> str:
    """A path in a recipe is relative to the recipe file, unless it exists from here."""
    p = Path(path)
    return str(p if p.is_absolute() or p.exists() else base / p)


@dataclass
class PlannedStep:
    """One step of a recipe as it will run. A stage: `megatron-rl train --config CONFIG OVERRIDES` (its model,
    data and run name decided by the steps before it) in RUN_DIR, finished once RUN_DIR/result.json exists. A
    filter: curation of SOURCE with MODEL into RUN_DIR, finished once RUN_DIR/report.json exists."""

    name: str
    kind: Literal["stage", "filter"]
    run_dir: Path
    done: Path
    step: StageStep | FilterStep
    config: str = ""
    overrides: list[str] = field(default_factory=list)
    domain: str = ""  # a stage's data.reward: math or code
    model: str | None = None  # the model it starts from (stage; None: the config's) or samples with (filter)
    source: Path | None = None  # a filter's input rows

    @property
    def finished(self) -> bool:
        return self.done.is_file()

    @property
    def started(self) -> bool:
        """A stage that wrote its run directory's config (its trainer started) and may have checkpoints."""
        return self.kind == "stage" and (self.run_dir / "config.yaml").is_file()


class RecipeRun:
    def __init__(self, recipe_path: Path, overrides: list[str], resume: bool, nproc: int = 1):
        self.path = recipe_path
        self.recipe = load_recipe(recipe_path)
        self.overrides, self.resume, self.nproc = overrides, resume, nproc
        first = self.recipe.steps[0]
        # Where the runs go: the first stage's config with the command-line overrides decides.
        cfg = load_config(_resolve(first.config, recipe_path.parent), [*first.overrides, *overrides])
        self.root = Path(cfg.run.output_dir) / self.recipe.name

    def domain(self, step: StageStep) -> str:
        return load_config(_resolve(step.config, self.path.parent), list(step.overrides)).data.reward

    def training_file(self, step: StageStep) -> str | None:
        """The recipe's training file for the stage's domain (`data:`), if it names one."""
        value = self.recipe.data.get(self.domain(step))
        return None if value is None else _expand(value, f"data.{self.domain(step)}")

    def stage_overrides(self, step: StageStep, model: str | None, data: dict[str, str]) -> list[str]:
        """The stage's own overrides; the recipe's training file for its domain; what the steps before it decide
        (the model, and a filter's kept rows, which win over any training file); the command line; its run name;
        and, with fit_max_num_seqs, the sequences per engine the plan finds room for."""
        own = list(step.overrides)
        chained = []
        if model is None and self.recipe.model is not None:
            model = _expand(self.recipe.model, "model")
        if model is not None and not any(o.startswith("model.path=") for o in own):
            chained.append(f"model.path={model}")
        training = self.training_file(step)
        if training is not None and "data.train_path" not in data:
            chained += ["data.source=file", f"data.train_path={training}"]
        chained += [f"{key}={value}" for key, value in data.items()]
        overrides = [*own, *chained, *self.overrides, f"run.name={self.recipe.name}/{step.stage}"]
        if self.recipe.fit_max_num_seqs:
            from megatron_rl.plan import fitting_max_num_seqs

            seqs = fitting_max_num_seqs(load_config(_resolve(step.config, self.path.parent), overrides))
            overrides.append(f"rollout.max_num_seqs={'null' if seqs is None else seqs}")
        return overrides

    def plan(self) -> list[PlannedStep]:
        """Every step with what it will run, in order, whether or not the steps before it have finished: a stage's
        model is the previous stage's RUN_DIR/final_model, a filter's output FILTER_DIR/curated.jsonl, paths known
        before they exist. A stage that fails its config check fails here, before anything runs."""
        planned: list[PlannedStep] = []
        model: str | None = None
        data: dict[str, str] = {}
        for i, step in enumerate(self.recipe.steps):
            if isinstance(step, StageStep):
                config = _resolve(step.config, self.path.parent)
                overrides = self.stage_overrides(step, model, data)
                cfg = load_config(config, overrides)
                run_dir = Path(cfg.run.output_dir) / cfg.run.name
                planned.append(
                    PlannedStep(step.stage, "stage", run_dir, run_dir / "result.json", step, config=config,
                                overrides=overrides, domain=cfg.data.reward, model=model)
                )  # fmt: skip
                model, data = str(run_dir / "final_model"), {}
            else:
                out, source, data = self.filter_plan(step, self.recipe.steps[i + 1])
                planned.append(
                    PlannedStep(
                        step.filter, "filter", out, out / "report.json", step, model=model, source=source
                    )
                )
        return planned

    def next_step(self) -> PlannedStep | None:
        """The first step that has not finished (a stage that started and stopped included), None when all have."""
        return next((p for p in self.plan() if not p.finished), None)

    def run(self, only: str | None = None) -> dict:
        """Run every step that has not finished, in order (only the step named `only`, when given: the steps
        before it must have finished); returns the summary (`only`: that step's result or report)."""
        started = time.perf_counter()
        self.root.mkdir(parents=True, exist_ok=True)
        planned = self.plan()
        if only is not None:
            names = [p.name for p in planned]
            if only not in names:
                raise ConfigError(
                    f"recipe {self.recipe.name} has no step '{only}' (its steps: {', '.join(names)})"
                )
            before = [p.name for p in planned[: names.index(only)] if not p.finished]
            if before:
                raise ConfigError(
                    f"step '{only}' comes after {', '.join(repr(n) for n in before)}, which did not finish: run "
                    "those first"
                )
            planned = [planned[names.index(only)]]
        ran = False
        for p in planned:
            if p.finished:
                where = f" ({p.done})" if p.kind == "stage" else ""
                log.info(
                    "recipe %s: %s %s finished before%s, not run again",
                    self.recipe.name,
                    p.kind,
                    p.name,
                    where,
                )
            elif p.kind == "stage":
                self.run_stage(p)
                ran = True
            else:
                self.run_filter(p)
                ran = True
        if only is not None:
            return {"step": only, **json.loads(planned[0].done.read_text())}
        return self.summary(time.perf_counter() - started if ran else None)

    def summary(self, seconds: float | None = None) -> dict:
        """The recipe's summary from its finished steps' results, written to ROOT/result.json. "minutes": `seconds`,
        how long the steps run by this process took; without it, those of the result.json there, else the sum of
        the stages' minutes (steps run by other processes, e.g. one Slurm job each)."""
        stages, filtered = [], {"kept": 0, "dropped": 0}
        for p in self.plan():
            if not p.finished:
                raise ConfigError(f"recipe {self.recipe.name}: step '{p.name}' has not finished")
            result = json.loads(p.done.read_text())
            if p.kind == "stage":
                stages.append(
                    {
                        "name": p.name,
                        "start_accuracy": result["sft_accuracy"],
                        "end_accuracy": result["rl_accuracy"],
                        "minutes": result["minutes"],
                    }
                )
            else:
                filtered["kept"] += result["kept"]
                filtered["dropped"] += result["input_rows"] - result["kept"]
        path = self.root / "result.json"
        if seconds is not None:
            minutes = round(seconds / 60, 2)
        elif path.is_file():
            minutes = json.loads(path.read_text()).get("minutes", 0.0)
        else:  # the steps ran elsewhere (a chain of jobs): the stages' own minutes
            minutes = round(sum(s["minutes"] for s in stages), 2)
        summary = {"stages": stages, "filtered": filtered, "minutes": minutes}
        self.root.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=1))
        return summary

    def run_stage(self, p: PlannedStep) -> dict:
        """`megatron-rl train` for the stage, in a subprocess (torchrun with --nproc > 1); a stage that started
        before is continued with --resume, and refused without it."""
        if p.started and not self.resume:
            raise ConfigError(
                f"stage '{p.name}' was started before in {p.run_dir} and did not finish: pass --resume to "
                "continue it from its latest checkpoint (or remove the directory to start it afresh)"
            )
        log.info(
            "recipe %s: stage %s (%s)%s", self.recipe.name, p.name, p.config, " resumed" if p.started else ""
        )
        launcher = [sys.executable]
        if self.nproc > 1:
            launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={self.nproc}"]
        args = [*launcher, "-m", "megatron_rl.cli", "train", "--config", p.config, *p.overrides]
        if p.started:
            args.append("--resume")
        proc = subprocess.run(args, stdout=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            raise RecipeStepFailed(
                f"stage '{p.name}' exited with status {proc.returncode}; see its log above", proc.returncode
            )
        return json.loads(p.done.read_text())

    def filter_plan(self, step: FilterStep, next_stage: StageStep) -> tuple[Path, Path, dict[str, str]]:
        """Where the filter writes, the rows it filters, and the data overrides that point the next stage at the
        kept rows."""
        out = self.root / step.filter
        chained: dict[str, str] = {}
        if step.synthetic is not None:
            source = out / "input.jsonl"
            chained["data.eval_path"] = str(out / "heldout.jsonl")
        elif step.data is not None:
            source = Path(_resolve(_expand(step.data, f"filter {step.filter} data"), self.path.parent))
        elif self.training_file(next_stage) is not None:
            source = Path(self.training_file(next_stage))
        else:
            cfg = load_config(
                _resolve(next_stage.config, self.path.parent), [*next_stage.overrides, *self.overrides]
            )
            if cfg.data.train_path is None:
                raise ConfigError(
                    f"filter '{step.filter}': give 'data' (or 'synthetic'), since stage '{next_stage.stage}' sets no "
                    "data.train_path"
                )
            source = Path(cfg.data.train_path)
        chained.update({"data.source": "file", "data.train_path": str(out / "curated.jsonl")})
        return out, source, chained

    def run_filter(self, p: PlannedStep) -> dict:
        """`megatron-rl curate --difficulty` with the model trained so far on the filter's rows (written first when
        synthetic); writes and returns its report."""
        step, out = p.step, p.run_dir
        assert isinstance(step, FilterStep) and p.model is not None and p.source is not None
        out.mkdir(parents=True, exist_ok=True)
        if step.synthetic is not None:
            next_stage = self.recipe.steps[self.recipe.steps.index(step) + 1]
            assert isinstance(next_stage, StageStep)
            self._write_synthetic(next_stage, step.synthetic, p.source, out / "heldout.jsonl")
        args = [
            sys.executable, "-m", "megatron_rl.cli", "curate", str(p.source), "--out", str(out), "--difficulty",
            "--model", p.model, "--k", str(step.k), "--temperature", str(step.temperature),
        ]  # fmt: skip
        if step.max_pass_rate is not None:
            args += ["--max-pass-rate", str(step.max_pass_rate)]
        if step.drop_unsolved:
            args.append("--drop-unsolved")
        log.info("recipe %s: filter %s on %s with %s", self.recipe.name, step.filter, p.source, p.model)
        proc = subprocess.run(args, stdout=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            raise RecipeStepFailed(
                f"filter '{step.filter}' exited with status {proc.returncode}", proc.returncode
            )
        report = json.loads(proc.stdout.strip().splitlines()[-1])
        if report["kept"] == 0:
            raise ConfigError(
                f"filter '{step.filter}' kept no row of {p.source}: loosen max_pass_rate or drop_unsolved"
            )
        p.done.write_text(json.dumps(report, indent=1))
        return report

    def _write_synthetic(self, next_stage: StageStep, count: int, train: Path, held_out: Path) -> None:
        from megatron_rl.data.synthetic import problem_row, synthetic_task

        cfg = load_config(
            _resolve(next_stage.config, self.path.parent), [*next_stage.overrides, *self.overrides]
        )
        task = synthetic_task(cfg.data)
        with train.open("w") as f:
            f.writelines(problem_row(task.train_problem(i)) for i in range(count))
        with held_out.open("w") as f:
            f.writelines(problem_row(p) for p in task.eval_set())


class RecipeStepFailed(RuntimeError):
    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status
