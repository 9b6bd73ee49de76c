"""NeMo-Run experiment for a whole recipe (`megatron-rl recipe`'s YAML): one task per step that has not finished,
each after the one before it.

    python -m launchers.recipe configs/recipe_tiny.yaml --executor local
    MODEL_PATH=... MATH_DATA=... CODE_DATA=... python -m launchers.recipe configs/recipe_acereason_7b.yaml \\
        --executor slurm --account ACCT --detach

megatron_rl/recipe.py plans the steps (each stage's model, data and run name from the steps before it).
Local executor: each task is `megatron-rl recipe RECIPE --step NAME --resume` (a stage with --nproc = its config's
GPUs per node), run one after the other; a step whose predecessors did not finish refuses to run. Slurm executor:
one job per step, each submitted with --dependency=afterok on the one before (NeMo-Run's sequential experiment):
a stage is `megatron-rl train --resume` with the planned overrides, one task per GPU on the nodes of its config's
cluster section (or the flags, as for the stage launchers in launchers/common.py); a filter is
`megatron-rl recipe RECIPE --step NAME` as one task on one node, with the environment variables the recipe file
reads. --retries requeues a failed job, which continues its stage from the latest checkpoint. Steps that have
finished are not launched again: launching again continues the recipe. The last stdout line is JSON: the
experiment, its status, the step names (and their Slurm job ids), and the recipe's summary once every step has
finished.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import nemo_run as run
from nemo_run.config import get_nemorun_home

from launchers.common import (
    ENV,
    REPO,
    ClusterSettings,
    LaunchError,
    add_launch_arguments,
    cluster_overrides,
    cluster_settings,
    local_executor,
    megatron_rl_script,
    slurm_executor,
    slurm_job_root,
    slurm_retries,
)
from megatron_rl.config import ConfigError, load_config
from megatron_rl.plan import PlanError
from megatron_rl.recipe import FilterStep, PlannedStep, RecipeRun


@dataclass
class StepTask:
    """One step of the recipe as a NeMo-Run task: what runs and where."""

    name: str
    kind: str  # stage or filter
    script: run.Script
    executor: run.Executor


def _repo_relative(path: str | Path) -> str:
    """A path inside this repository, relative to it (the Slurm job runs in NeMo-Run's copy of the repo)."""
    p = Path(path).resolve()
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p)


def recipe_variables(recipe: RecipeRun) -> dict[str, str]:
    """The environment variables the recipe file reads (${VAR} in model:, data: and a filter's data), with their
    values here: a filter task plans the recipe again where it runs."""
    texts = [recipe.recipe.model or "", *recipe.recipe.data.values()]
    texts += [s.data or "" for s in recipe.recipe.steps if isinstance(s, FilterStep)]
    names = {m.group(1) for text in texts for m in re.finditer(r"\$\{?(\w+)", text)}
    return {name: os.environ[name] for name in sorted(names) if name in os.environ}


def recipe_tasks(
    recipe_path: Path,
    overrides: list[str],
    executor: str,
    flags: dict | None = None,
    python: str | None = None,
    job_root: str | None = None,
    ssh_host: str | None = None,
    ssh_user: str | None = None,
    retries: int = 0,
) -> tuple[RecipeRun, list[StepTask]]:
    """The recipe (with `overrides` for every stage, run.output_dir included) and one task per unfinished step,
    in order. `executor`: local or slurm; `flags`: the Slurm settings given on the command line (launchers/common.py
    ENV keys)."""
    recipe = RecipeRun(recipe_path, overrides, resume=True)
    planned = [p for p in recipe.plan() if not p.finished]
    env = recipe_variables(recipe)
    recipe_arg = str(recipe_path.resolve()) if executor == "local" else _repo_relative(recipe_path)
    tasks = []
    for p in planned:
        cfg = load_config(p.config, p.overrides) if p.kind == "stage" else None
        settings = cluster_settings(cfg, flags) if cfg is not None else _filter_settings(recipe, p, flags)
        if executor == "local":
            if settings.nodes > 1:
                raise LaunchError(
                    f"step '{p.name}' wants cluster.nodes={settings.nodes}: the local executor runs one"
                )
            nproc = settings.gpus_per_node if p.kind == "stage" else 1
            args = ["recipe", recipe_arg, "--step", p.name, "--resume", "--nproc", str(nproc), *overrides]
            script = run.Script(
                path="megatron_rl.cli", m=True, entrypoint=python or sys.executable, args=args
            )
            tasks.append(StepTask(p.name, p.kind, script, local_executor(env)))
            continue
        assert job_root is not None
        ex = slurm_executor(settings, job_root, ssh_host, ssh_user, env=env, retries=retries)
        if p.kind == "stage":
            assert cfg is not None
            stage_overrides = [*p.overrides, *cluster_overrides(cfg, settings)]
            script = megatron_rl_script("train", Path(_repo_relative(p.config)), stage_overrides, python or "python",
                                        resume=True)  # fmt: skip
        else:
            ex.nodes, ex.ntasks_per_node = 1, 1  # one process, which sees the node's GPUs
            args = ["recipe", recipe_arg, "--step", p.name, *overrides]
            script = run.Script(path="megatron_rl.cli", m=True, entrypoint=python or "python", args=args)
        tasks.append(StepTask(p.name, p.kind, script, ex))
    return recipe, tasks


def _filter_settings(recipe: RecipeRun, p: PlannedStep, flags: dict | None) -> ClusterSettings:
    """A filter's machine: the next stage's settings (its GPUs per node, account, partition, time, container)."""
    plan = recipe.plan()
    following = next(q for q in plan[plan.index(p) + 1 :] if q.kind == "stage")
    return cluster_settings(load_config(following.config, following.overrides), flags)


def run_recipe(name: str, tasks: list[StepTask], dryrun: bool = False, detach: bool = False) -> dict:
    """The tasks as one sequential NeMo-Run experiment (Slurm: each job depends on the previous one, afterok)."""
    with run.Experiment(
        name, executor=tasks[0].executor, log_level="WARN", enable_goodbye_message=False
    ) as exp:
        for task in tasks:
            exp.add(task.script, executor=task.executor, name=task.name, tail_logs=False)
        if dryrun:
            exp.dryrun(log=True)
            return {"experiment_id": exp._id, "status": "DRYRUN", "steps": [t.name for t in tasks]}
        exp.run(sequential=True, detach=detach)
    states = [job.state.name if job.state is not None else "UNKNOWN" for job in exp.jobs]
    status = next((s for s in states if s != "SUCCEEDED"), "SUCCEEDED")
    result: dict = {"experiment_id": exp._id, "status": status, "steps": [t.name for t in tasks]}
    if isinstance(tasks[0].executor, run.SlurmExecutor):  # handles are slurm_tunnel://nemo_run/<job id>
        result["slurm_job_ids"] = [job.handle.rsplit("/", 1)[-1] for job in exp.jobs]
    return result


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launchers.recipe", description=__doc__.split("\n\n")[0])
    p.add_argument("recipe", type=Path, help="recipe YAML (megatron_rl/recipe.py)")
    add_launch_arguments(p, "the first stage config's")
    p.add_argument("overrides", nargs="*", help="config overrides for every stage, key=value")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    slurm = args.executor == "slurm"
    flags = {k: getattr(args, k) for k in ENV}
    try:
        job_root = slurm_job_root(args.job_dir, args.ssh_host) if slurm else None
        if args.output_dir:
            output_dir = args.output_dir
        elif slurm:  # the jobs run from NeMo-Run's copy of the code: keep runs next to it, on the cluster
            output_dir = str(Path(job_root) / "runs" if args.ssh_host else Path(get_nemorun_home()) / "runs")
        else:
            output_dir = str(REPO / RecipeRun(args.recipe, list(args.overrides), resume=True).root.parent)
        overrides = [*args.overrides, f"run.output_dir={output_dir}"]
        retries = slurm_retries(args.retries) if slurm else 0
        recipe, tasks = recipe_tasks(args.recipe, overrides, args.executor, flags, args.python, job_root,
                                     args.ssh_host, args.ssh_user, retries)  # fmt: skip
    except (ConfigError, LaunchError, PlanError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not tasks:
        print(json.dumps({"status": "SUCCEEDED", "steps": [], "summary": recipe.summary()}))
        return 0
    result = run_recipe(recipe.recipe.name, tasks, dryrun=args.dryrun, detach=args.detach)
    if result["status"] == "SUCCEEDED" and recipe.next_step() is None:
        result["summary"] = recipe.summary()
    print("\n" + json.dumps(result))  # on its own line, after NeMo-Run's progress display
    ok = result["status"] in ("SUCCEEDED", "DRYRUN") or (args.detach and result["status"] != "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
