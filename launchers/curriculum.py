"""The AceReason stage curriculum as config overrides (no NeMo-Run import here: usable without it).

Each stage config (configs/{math,code}_stage_{7b,14b}.yaml) is the first stage of its domain; a later stage is
the same file plus the overrides below. The layout (TP, recompute, micro-batch budget, vLLM memory share) is the
same for every stage, sized for the longest one; only the response length, samples per prompt, temperature,
overlong filtering and the number of sequences one vLLM engine runs at once change; the last is derived from
`megatron-rl plan` for each stage. tests/test_plan.py checks that every stage fits.

Sources, as in the config files: [A] arXiv 2505.16400, [B] arXiv 2506.13284, [C] the AceMath-RL blog.
- math: 8K -> 16K -> 24K -> 32K responses [A][C]; stages 3 and 4 train on the hard prompts only (about 2K
  problems selected by pass rate [C]: point data.train_path at that subset); overlong filtering on for the
  8K/16K budgets and off for 24K/32K [B]; 8 or 16 samples per prompt [B] (8 at 8K, 16 after: our choice).
- code: stage 1 at 24,000 tokens, temperature 0.6, 8 samples; stage 2 at 32,768 tokens, temperature raised
  from 0.6 to 1.0 and samples from 8 to 16 over its epochs, easy problems filtered out after each epoch [A].
  "2" is stage 2's first epoch, "2-final" its last setting.
"""

from __future__ import annotations

from pathlib import Path

from megatron_rl.config import load_config
from megatron_rl.plan import fitting_max_num_seqs

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
TINY_CONFIG = CONFIGS / "tiny_math.yaml"

# domain -> stage -> overrides shared by both model sizes
STAGES: dict[str, dict[str, list[str]]] = {
    "math": {
        "1": [],
        "2": ["rollout.max_response_tokens=16384", "rollout.group_size=16"],
        "3": ["rollout.max_response_tokens=24576", "rollout.group_size=16", "grpo.overlong_filtering=false"],
        "4": ["rollout.max_response_tokens=32768", "rollout.group_size=16", "grpo.overlong_filtering=false"],
    },
    "code": {
        "1": [],
        "2": ["rollout.max_response_tokens=32768"],
        "2-final": ["rollout.max_response_tokens=32768", "rollout.temperature=1.0", "rollout.group_size=16"],
    },
}

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
