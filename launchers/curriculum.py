"""The AceReason stage curriculum per domain, read from the recipe files (no NeMo-Run import here: usable
without it).

configs/recipe_acereason_{7b,14b}.yaml are the schedule (`megatron-rl recipe` runs them; sources are cited
there). Each stage config (configs/{math,code}_stage_{7b,14b}.yaml) is the first stage of its domain; a later
stage is the same file plus its recipe overrides. The layout (TP, recompute, micro-batch budget, vLLM memory
share) is the same for every stage, sized for the longest one; only the response length, samples per prompt,
temperature, overlong filtering and the number of sequences one vLLM engine runs at once change; the last is
derived from `megatron-rl plan` for each stage. tests/test_plan.py checks that every stage fits.
"""

from __future__ import annotations

import re
from pathlib import Path

from megatron_rl.config import load_config
from megatron_rl.plan import fitting_max_num_seqs
from megatron_rl.recipe import StageStep, load_recipe

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
TINY_CONFIG = CONFIGS / "tiny_math.yaml"


def recipe_path(model: str) -> Path:
    return CONFIGS / f"recipe_acereason_{model}.yaml"


def _stages(model: str) -> dict[str, dict[str, list[str]]]:
    """domain -> stage -> overrides, from the recipe's stage steps named DOMAIN + STAGE (e.g. math3, code2-final)."""
    stages: dict[str, dict[str, list[str]]] = {}
    for step in load_recipe(recipe_path(model)).steps:
        if isinstance(step, StageStep):
            domain, stage = re.fullmatch(r"(math|code)(.+)", step.stage).groups()
            stages.setdefault(domain, {})[stage] = list(step.overrides)
    return stages


# domain -> stage -> overrides shared by both model sizes (tests/test_plan.py checks that the 14B recipe agrees)
STAGES: dict[str, dict[str, list[str]]] = _stages("7b")

MODELS = ("7b", "14b")


def stage_config(domain: str, model: str) -> Path:
    if domain not in STAGES:
        raise ValueError(f"domain '{domain}': one of {', '.join(STAGES)}")
    if model not in MODELS:
        raise ValueError(f"model '{model}': one of {', '.join(MODELS)}")
    return CONFIGS / f"{domain}_stage_{model}.yaml"


def stage_overrides(domain: str, model: str, stage: str) -> list[str]:
    """Overrides that turn `stage_config(domain, model)` (stage 1) into `stage`, ending with the number of
    sequences one vLLM engine runs at once: what `plan` finds fits at full length in the KV cache for that
    stage (plan.fitting_max_num_seqs; null: the engine's whole share of the batch fits)."""
    path = stage_config(domain, model)
    if stage not in STAGES[domain]:
        raise ValueError(f"{domain} stage '{stage}': one of {', '.join(STAGES[domain])}")
    overrides = [f"run.name={domain}_stage{stage}_{model}", *STAGES[domain][stage]]
    seqs = fitting_max_num_seqs(load_config(path, overrides))
    return [*overrides, f"rollout.max_num_seqs={'null' if seqs is None else seqs}"]
