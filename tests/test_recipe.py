"""`megatron-rl recipe`: stages chained through a hard-prompt filter, killed during the second stage and
resumed without rerunning the first; the filter keeps exactly what the pass rates say; bad recipes refused."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_rl.config import ConfigError
from megatron_rl.recipe import RecipeRun, load_recipe
from tests.test_train_run import kill_run

STAGE_1 = [
    "run.steps=2", "run.checkpoint_every=1", "run.reward_workers=1", "sft.max_steps=30", "sft.eval_after=30",
    "sft.eval_every=30", "sft.stop_at_accuracy=0", "data.synthetic_digits=1", "data.synthetic_eval_size=24",
    "rollout.prompts_per_step=8", "rollout.max_response_tokens=24", "eval.samples_per_problem=2",
]  # fmt: skip


def write_recipe(tmp_path: Path) -> Path:
    repo = Path(__file__).resolve().parent.parent
    recipe = {
        "name": "mini",
        "steps": [
            {"stage": "first", "config": str(repo / "configs" / "tiny_math.yaml"), "overrides": STAGE_1},
            {"filter": "hard", "synthetic": 40, "k": 2, "max_pass_rate": 0.5},
            {
                "stage": "second",
                "config": str(repo / "configs" / "tiny_math.yaml"),
                "overrides": [*STAGE_1, "sft.enabled=false", "run.steps=3"],
            },
        ],
    }
    path = tmp_path / "mini.yaml"
    path.write_text(json.dumps(recipe))
    return path


def test_recipe_killed_in_its_second_stage_resumes_there(tmp_path):
    recipe = write_recipe(tmp_path)
    out = tmp_path / "runs"
    args = [sys.executable, "-m", "megatron_rl.cli", "recipe", str(recipe), f"run.output_dir={out}"]
    first_result = out / "mini" / "first" / "result.json"
    second_latest = out / "mini" / "second" / "checkpoints" / "latest"
    with open(tmp_path / "killed.err", "w") as err:
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    deadline = time.time() + 900
    try:
        while not second_latest.is_file() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
    finally:
        kill_run(proc.pid)
        proc.wait()
    assert second_latest.is_file(), (tmp_path / "killed.err").read_text()[-4000:]
    finished_at = first_result.stat().st_mtime

    refused = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "stage 'second' was started before" in refused.stderr

    resumed = subprocess.run([*args, "--resume"], capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "stage first finished before" in resumed.stderr and "filter hard finished before" in resumed.stderr
    assert "resumed from" in resumed.stderr  # the second stage continued from its checkpoint
    assert first_result.stat().st_mtime == finished_at
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert [s["name"] for s in summary["stages"]] == ["first", "second"]
    assert json.loads((out / "mini" / "result.json").read_text()) == summary

    # The second stage started from the first one's final model and trained on the filter's kept rows.
    second_cfg = json.loads((out / "mini" / "second" / "config.yaml").read_text())
    assert second_cfg["model"]["path"] == str(out / "mini" / "first" / "final_model")
    assert second_cfg["data"]["train_path"] == str(out / "mini" / "hard" / "curated.jsonl")
    assert second_cfg["data"]["eval_path"] == str(out / "mini" / "hard" / "heldout.jsonl")

    # The kept set is what the per-problem pass rates say: solved at most once of twice.
    report = json.loads((out / "mini" / "hard" / "report.json").read_text())
    kept = [json.loads(x) for x in (out / "mini" / "hard" / "curated.jsonl").read_text().splitlines()]
    removed = [json.loads(x) for x in (out / "mini" / "hard" / "removed.jsonl").read_text().splitlines()]
    graded = [(r["prompt"], r["pass_rate"]) for r in kept] + [
        (r["row"]["prompt"], int(r["removed"]["solved"].split("/")[0]) / 2)
        for r in removed
        if r["removed"]["reason"] == "too_easy"
    ]
    assert sorted(p for p, rate in graded if rate <= 0.5) == sorted(r["prompt"] for r in kept)
    assert summary["filtered"] == {"kept": report["kept"], "dropped": 40 - report["kept"]}

    again = subprocess.run(args, capture_output=True, text=True, timeout=120)  # all done: nothing runs
    assert (
        again.returncode == 0
        and json.loads(again.stdout.strip().splitlines()[-1])["stages"] == summary["stages"]
    )


def test_plan_and_one_step(tmp_path):
    """Every step is planned before any runs (the second stage's model is the first one's final model); --step runs
    one step only once the steps before it have finished."""
    out = tmp_path / "runs"
    run = RecipeRun(write_recipe(tmp_path), [f"run.output_dir={out}"], resume=False)
    plan = run.plan()
    assert [(p.name, p.kind) for p in plan] == [("first", "stage"), ("hard", "filter"), ("second", "stage")]
    assert plan[1].model == str(out / "mini" / "first" / "final_model")
    assert f"model.path={out}/mini/first/final_model" in plan[2].overrides
    assert f"data.train_path={out}/mini/hard/curated.jsonl" in plan[2].overrides
    assert run.next_step().name == "first"
    with pytest.raises(ConfigError, match="step 'second' comes after 'first', 'hard', which did not finish"):
        run.run(only="second")
    with pytest.raises(ConfigError, match="has no step 'nope'"):
        run.run(only="nope")


@pytest.mark.parametrize(
    "steps,message",
    [
        ([{"filter": "f", "synthetic": 4}], "the first step must be a stage"),
        (
            [{"stage": "a", "config": "x.yaml"}, {"filter": "f", "synthetic": 4}],
            "filter 'f' must be followed",
        ),
        (
            [{"stage": "a", "config": "x.yaml"}, {"stage": "a", "config": "x.yaml"}],
            "step names must be unique",
        ),
        ([{"stage": "a", "config": "x.yaml", "overides": []}], "recipe key 'steps.0"),
    ],
)
def test_bad_recipe_is_one_line_naming_the_problem(tmp_path, steps, message):
    path = tmp_path / "bad.yaml"
    path.write_text(json.dumps({"name": "bad", "steps": steps}))
    with pytest.raises(ConfigError, match=message):
        load_recipe(path)


def test_tiny_recipe_file_loads():
    repo = Path(__file__).resolve().parent.parent
    run = RecipeRun(repo / "configs" / "recipe_tiny.yaml", ["run.output_dir=/tmp/nowhere"], resume=False)
    assert [getattr(s, "stage", None) or s.filter for s in run.recipe.steps] == [
        "math",
        "hard_prompts",
        "math_hard",
        "code",
    ]
    assert run.root == Path("/tmp/nowhere/recipe_tiny")


def test_acereason_recipes_are_the_curriculum(monkeypatch):
    """The 7B and 14B recipe files hold the same stages; each stage gets the domain's training file, the first
    one the model, and the sequences per engine the plan finds room for (what launchers/curriculum.py gives)."""
    from launchers.curriculum import STAGES, _stages, recipe_path, stage_overrides
    from megatron_rl.recipe import StageStep

    assert _stages("14b") == STAGES and list(STAGES) == ["math", "code"]
    with pytest.raises(ConfigError, match="environment variable MODEL_PATH is not set"):
        run = RecipeRun(recipe_path("7b"), [], resume=False)
        run.stage_overrides(run.recipe.steps[0], None, {})
    monkeypatch.setenv("MODEL_PATH", "/models/r1-distill-7b")
    monkeypatch.setenv("MATH_DATA", "/data/math.jsonl")
    monkeypatch.setenv("CODE_DATA", "/data/code.jsonl")
    for model in ("7b", "14b"):
        run = RecipeRun(recipe_path(model), ["run.output_dir=/tmp/nowhere"], resume=False)
        stages = [s for s in run.recipe.steps if isinstance(s, StageStep)]
        assert [s.stage for s in stages] == [
            "math1",
            "math2",
            "math3",
            "code1",
            "code2",
            "code2-final",
            "math4",
        ]
        for i, step in enumerate(stages):
            overrides = run.stage_overrides(step, None if i == 0 else "/runs/previous/final_model", {})
            domain, stage = step.stage[:4], step.stage[4:]
            assert overrides[-1] == stage_overrides(domain, model, stage)[-1]  # rollout.max_num_seqs
            assert f"data.train_path=/data/{domain}.jsonl" in overrides
            assert ("model.path=/models/r1-distill-7b" in overrides) == (i == 0)
        # A filter's kept rows win over the domain's file.
        kept = run.stage_overrides(
            stages[2], "/m", {"data.source": "file", "data.train_path": "/f/curated.jsonl"}
        )
        assert [o for o in kept if o.startswith("data.train_path=")] == ["data.train_path=/f/curated.jsonl"]
