"""NeMo-Run launchers: a real local run of the tiny config, and the Slurm executor built from config/env/flags.

The Slurm side is not submitted here: the executor's settings are checked and NeMo-Run renders the sbatch
script it would submit (tests/test_slurm.py covers a real one-node Slurm).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import nemo_run as run
except ImportError as e:  # a declared requirement: fail loudly rather than skip
    pytest.fail(
        f"NeMo-Run does not import ({e}); nemo-run 0.11.1 needs leptonai<0.47: "
        "pip install --no-deps leptonai==0.27.3 (docs/launching.md)",
        pytrace=False,
    )
from nemo_run.config import get_nemorun_home, set_nemorun_home  # noqa: E402

from launchers.common import (  # noqa: E402
    LaunchError,
    cluster_overrides,
    cluster_settings,
    main,
    megatron_rl_script,
    sbatch_script,
    slurm_executor,
    slurm_job_root,
    slurm_retries,
)
from launchers.curriculum import stage_config, stage_overrides  # noqa: E402
from megatron_rl.config import load_config  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

# A few-second tiny run (as tests/test_train_run.py): 1-digit sums, no SFT, one RL step.
QUICK = [
    "run.steps=1", "run.checkpoint_every=1", "run.reward_workers=1", "run.tensorboard=false",
    "sft.enabled=false", "data.synthetic_digits=1", "data.synthetic_eval_size=8",
    "rollout.prompts_per_step=4", "rollout.group_size=4", "rollout.max_response_tokens=16",
    "eval.samples_per_problem=1",
]  # fmt: skip


@pytest.fixture(autouse=True)
def nemorun_home(tmp_path, monkeypatch):
    """NeMo-Run's experiment records go to a temp dir; its local shell commands (invoke) mirror stdin, which
    pytest captures, so they get an empty one."""
    before = get_nemorun_home()
    set_nemorun_home(str(tmp_path / "nemo_run_home"))
    with open(os.devnull) as empty:
        monkeypatch.setattr(sys, "stdin", empty)
        yield
    set_nemorun_home(before)


def test_local_executor_runs_the_tiny_config_to_completion(tmp_path):
    env = {**os.environ, "NEMORUN_HOME": str(tmp_path / "home")}
    args = [
        sys.executable, "-m", "launchers.math_stage", "--executor", "local",
        "--output-dir", str(tmp_path / "runs"), "run.name=nemo_local", *QUICK,
    ]  # fmt: skip
    proc = subprocess.run(args, capture_output=True, text=True, timeout=900, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["status"] == "SUCCEEDED"
    run_dir = Path(result["run_dir"])
    assert run_dir == tmp_path / "runs" / "nemo_local"
    assert (run_dir / "metrics.jsonl").is_file() and (run_dir / "result.json").is_file()
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1]
    assert set(json.loads((run_dir / "result.json").read_text())) >= {"sft_accuracy", "rl_accuracy"}
    # NeMo-Run kept the task's log under its experiment directory.
    logs = list((tmp_path / "home" / "experiments").rglob("stdout.log"))
    assert logs, "no NeMo-Run task log"


def test_slurm_executor_from_config_env_and_flags(tmp_path):
    cfg = load_config(stage_config("math", "14b"))
    env = {
        "MEGATRON_RL_SLURM_ACCOUNT": "rl-acct",
        "MEGATRON_RL_SLURM_PARTITION": "from-env",
        "MEGATRON_RL_NODES": "",
    }
    settings = cluster_settings(cfg, {"partition": "batch", "time": "02:00:00"}, env=env)
    assert settings.nodes == 8 and settings.gpus_per_node == 8  # the config's cluster section
    assert settings.account == "rl-acct"  # environment
    assert settings.partition == "batch" and settings.time == "02:00:00"  # flags win over env and config
    assert cluster_overrides(cfg, settings) == []  # machine counts unchanged: nothing to tell the trainer

    ex = slurm_executor(settings, str(tmp_path / "jobs"))
    assert isinstance(ex, run.SlurmExecutor)
    assert (ex.nodes, ex.ntasks_per_node, ex.gpus_per_node) == (8, 8, 8)  # one task per GPU
    assert (ex.account, ex.partition, ex.time, ex.container_image) == ("rl-acct", "batch", "02:00:00", None)
    assert isinstance(ex.tunnel, run.LocalTunnel) and ex.tunnel.job_dir == str(tmp_path / "jobs")

    env = {"MEGATRON_RL_SLURM_ACCOUNT": "a", "MEGATRON_RL_NODES": "2", "MEGATRON_RL_CONTAINER_IMAGE": "img:1"}
    settings = cluster_settings(cfg, {"gpus_per_node": 4}, env=env)
    assert (settings.nodes, settings.gpus_per_node, settings.container_image) == (2, 4, "img:1")
    assert cluster_overrides(cfg, settings) == ["cluster.nodes=2", "cluster.gpus_per_node=4"]
    ex = slurm_executor(settings, str(tmp_path / "jobs"))
    assert (ex.nodes, ex.ntasks_per_node, ex.gpus_per_node, ex.container_image) == (2, 4, 4, "img:1")


def test_slurm_executor_needs_an_account_and_integer_counts():
    cfg = load_config(stage_config("code", "7b"))
    with pytest.raises(LaunchError, match="no Slurm account"):
        slurm_executor(cluster_settings(cfg, {}, env={}), "/jobs")
    with pytest.raises(LaunchError, match="nodes must be an integer"):
        cluster_settings(cfg, {}, env={"MEGATRON_RL_NODES": "four"})


def test_nemo_run_renders_the_sbatch_script(tmp_path):
    cfg = load_config(stage_config("math", "7b"))
    settings = cluster_settings(cfg, {"account": "acct", "partition": "batch"}, env={})
    ex = slurm_executor(settings, str(tmp_path / "jobs"))
    ex.packager = run.Packager()  # skip NeMo-Run's git archive of the repo: only the script is looked at
    overrides = stage_overrides("math", "7b", "3")
    script = megatron_rl_script("train", Path("configs/math_stage_7b.yaml"), overrides, "python")
    text = sbatch_script("math_stage3_7b", script, ex)
    for line in (
        "#SBATCH --account=acct",
        "#SBATCH --partition=batch",
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --time=04:00:00",
        "#SBATCH --exclusive",
    ):
        assert line in text.splitlines(), line
    srun = next(line for line in text.splitlines() if line.startswith("srun "))
    assert "python -m megatron_rl.cli train --config configs/math_stage_7b.yaml" in srun
    assert " ".join(overrides) in srun


def test_launcher_refuses_a_config_that_does_not_fit(capsys):
    code = main(
        "math",
        [
            "--executor",
            "slurm",
            "--model",
            "14b",
            "--stage",
            "4",
            "--account",
            "a",
            "--nodes",
            "1",
            "--dryrun",
        ],
    )
    assert code == 1
    assert "does not fit" in capsys.readouterr().err


def test_code_stage_has_no_tiny_config(capsys):
    assert main("code", ["--executor", "local"]) == 2
    assert "no tiny code config" in capsys.readouterr().err


def test_separate_placement_is_left_to_the_sbatch_scripts(capsys):
    argv = ["--executor", "slurm", "--model", "7b", "--account", "a", "--dryrun"]
    assert main("math", [*argv, "rollout.placement=separate", "rollout.engine_nodes=1"]) == 2
    err = capsys.readouterr().err
    assert "rollout.placement=separate" in err and "slurm/math_stage.sh" in err


def test_slurm_job_files_go_where_nemo_run_submits_them_from(tmp_path, monkeypatch):
    """From a login node NeMo-Run writes the sbatch script into its home's experiments/ and submits that path:
    --job-dir moves its home. Over SSH the job directory is on the cluster and has no default."""
    monkeypatch.delenv("MEGATRON_RL_SLURM_JOB_DIR", raising=False)
    assert slurm_job_root() == os.path.join(get_nemorun_home(), "experiments")
    assert slurm_job_root(str(tmp_path / "jobs")) == str(tmp_path / "jobs" / "experiments")
    assert get_nemorun_home() == str(tmp_path / "jobs")
    with pytest.raises(LaunchError, match="--ssh-host needs --job-dir"):
        slurm_job_root(None, "login01")
    monkeypatch.setenv("MEGATRON_RL_SLURM_JOB_DIR", "/lustre/me/jobs")
    assert slurm_job_root(None, "login01") == "/lustre/me/jobs"


def test_slurm_job_resumes_and_retries(tmp_path, monkeypatch):
    monkeypatch.setenv("MEGATRON_RL_SLURM_RETRIES", "3")
    assert (slurm_retries(None), slurm_retries(1)) == (3, 1)  # the flag wins over the environment
    monkeypatch.setenv("MEGATRON_RL_SLURM_RETRIES", "two")
    with pytest.raises(LaunchError, match="MEGATRON_RL_SLURM_RETRIES must be a whole number, got 'two'"):
        slurm_retries(None)
    cfg = load_config(stage_config("math", "7b"))
    settings = cluster_settings(cfg, {"account": "acct"}, env={})
    assert slurm_executor(settings, str(tmp_path), retries=2).retries == 2
    with pytest.raises(LaunchError, match="retries must be 0 or more"):
        slurm_executor(settings, str(tmp_path), retries=-1)
    script = megatron_rl_script(
        "train", Path("configs/math_stage_7b.yaml"), ["run.steps=3"], "python", resume=True
    )
    assert script.args == ["train", "--config", "configs/math_stage_7b.yaml", "--resume", "run.steps=3"]


def test_recipe_is_one_task_per_unfinished_step(tmp_path):
    """launchers/recipe.py: on Slurm a stage is the trainer with the overrides the recipe plans for it (the model
    and data of the steps before it), a filter one task of `megatron-rl recipe --step`; a finished step is not
    launched again; locally every step is `megatron-rl recipe --step NAME --resume`."""
    from launchers.recipe import recipe_tasks

    recipe, out = REPO / "configs" / "recipe_tiny.yaml", tmp_path / "runs"
    overrides = [f"run.output_dir={out}"]
    _, tasks = recipe_tasks(recipe, overrides, "slurm", {"account": "acct"}, "python", str(tmp_path / "jobs"))
    assert [(t.name, t.kind) for t in tasks] == [
        ("math", "stage"), ("hard_prompts", "filter"), ("math_hard", "stage"), ("code", "stage"),
    ]  # fmt: skip
    math_hard = tasks[2].script.args
    assert math_hard[:4] == ["train", "--config", "configs/tiny_math.yaml", "--resume"]
    assert f"model.path={out}/recipe_tiny/math/final_model" in math_hard
    assert f"data.train_path={out}/recipe_tiny/hard_prompts/curated.jsonl" in math_hard
    assert math_hard[-1] == "run.name=recipe_tiny/math_hard"
    assert tasks[3].script.args[2] == "configs/tiny_code.yaml"
    assert tasks[1].script.args == [
        "recipe",
        "configs/recipe_tiny.yaml",
        "--step",
        "hard_prompts",
        *overrides,
    ]
    assert (tasks[1].executor.nodes, tasks[1].executor.ntasks_per_node) == (1, 1)
    assert all(isinstance(t.executor, run.SlurmExecutor) and t.executor.account == "acct" for t in tasks)

    (out / "recipe_tiny" / "math").mkdir(parents=True)
    (out / "recipe_tiny" / "math" / "result.json").write_text("{}")  # the first stage has finished
    _, tasks = recipe_tasks(recipe, overrides, "local")
    assert [t.name for t in tasks] == ["hard_prompts", "math_hard", "code"]
    assert tasks[0].script.args == [
        "recipe", str(recipe), "--step", "hard_prompts", "--resume", "--nproc", "1", *overrides,
    ]  # fmt: skip
