"""Prompts -> vLLM samples -> rewards -> GRPO advantages (with overlong filtering and dynamic sampling)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sized
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.distributed as dist

from megatron_rl.algo.grpo import group_advantages, informative_groups, loss_mask
from megatron_rl.config import ConfigError
from megatron_rl.data.epochs import SolvedPromptRemoval
from megatron_rl.data.prompts import render_prompt
from megatron_rl.rewards.math_grader import unfinished_response
from megatron_rl.rollout.fanout import slices
from megatron_rl.train.reward_scoring import DistributedScorer

log = logging.getLogger(__name__)


@dataclass
class RolloutBatch:
    prompts: list[list[int]]  # one per sample (repeated within a group)
    responses: list[list[int]]
    rollout_logprobs: list[list[float]]
    rewards: list[float]
    truncated: list[bool]
    advantages: list[float]
    trained: list[bool]  # contributes to the loss
    temperature: float  # what it was sampled at: the loss's log-probs are at this temperature too
    texts: list[str] = field(default_factory=list)
    data_position: int = 0  # the next unused prompt index after this batch
    # per sample: the weights it was sampled with, as the RL step after which they were synced (0: the start)
    policy_versions: list[int] = field(default_factory=list)
    stats: dict[str, float] = field(default_factory=dict)


def prompt_fits(problem, tokenizer, cfg) -> bool:
    ids = render_prompt(problem, tokenizer, cfg.data.prompt_template, cfg.data.instruction)
    return len(ids) <= cfg.rollout.max_prompt_tokens


def fitting_prompts(problems: list, tokenizer, cfg, what: str) -> list:
    """The problems whose rendered prompt is at most rollout.max_prompt_tokens; the rest skipped and counted."""
    kept = [p for p in problems if prompt_fits(p, tokenizer, cfg)]
    if len(kept) < len(problems):
        log.warning(
            "%s: %d of %d prompts are longer than rollout.max_prompt_tokens=%d and are skipped",
            what,
            len(problems) - len(kept),
            len(problems),
            cfg.rollout.max_prompt_tokens,
        )
    if not kept:
        raise ConfigError(f"{what}: no prompt fits rollout.max_prompt_tokens={cfg.rollout.max_prompt_tokens}")
    return kept


class Drawn(NamedTuple):
    problems: list  # the training problems drawn, in order
    data_position: int  # the next unused data position
    skipped: int  # prompts passed over for being longer than rollout.max_prompt_tokens
    rows: list[int]  # each problem's dataset row under easy-prompt removal; else its data position


def next_problems(
    dataset, data_position: int, count: int, tokenizer, cfg, removal: SolvedPromptRemoval | None = None
) -> Drawn:
    """`count` training problems from `data_position` on, skipping prompts longer than max_prompt_tokens.

    With easy-prompt removal (data.drop_solved_each_epoch) positions map to rows through `removal`, and the
    draw stops early at the end of an epoch: the next epoch's rows depend on the scores of this one's last
    prompts, which the caller records before drawing again."""
    problems, rows, skipped = [], [], 0
    total = len(removal.rows) if removal is not None else len(dataset) if isinstance(dataset, Sized) else 0
    while len(problems) < count:
        if removal is not None and data_position == removal.end:
            if problems:
                break
            removal.next_epoch()
            total = len(removal.rows)
        row = removal.row(data_position) if removal is not None else data_position
        problem = dataset.train_problem(row)
        data_position += 1
        if prompt_fits(problem, tokenizer, cfg):
            problems.append(problem)
            rows.append(row)
            continue
        skipped += 1
        if total and skipped >= total:  # a whole epoch and none fits
            raise ConfigError(
                f"no training prompt fits rollout.max_prompt_tokens={cfg.rollout.max_prompt_tokens}"
            )
    return Drawn(problems, data_position, skipped, rows)


def unfinished(sample) -> bool:
    """Cut off at the length limit before its reasoning closed (no </think>): a \\boxed{} or code block in it is
    a guess made mid-thought, not the answer the model committed to, so it scores 0 whatever it holds."""
    return unfinished_response(sample.text, sample.finish_reason)


def score(pool, samples: list, problems: list, cfg) -> list[float]:
    """The stage's verifiable reward: math (last \\boxed{} vs the answer) or code (all tests pass), 0 for
    unfinished samples (see `unfinished`), which are not sent to the reward workers."""
    todo = [i for i, s in enumerate(samples) if not unfinished(s)]
    texts, todo_problems = [samples[i].text for i in todo], [problems[i] for i in todo]
    if cfg.data.reward == "code":
        scored = pool.score_code(
            texts,
            [p.tests for p in todo_problems],
            [p.fn_name for p in todo_problems],
            timeout=cfg.run.reward_timeout,
        )
    else:
        scored = pool.score_math(texts, [p.answer for p in todo_problems], timeout=cfg.run.reward_timeout)
    rewards = [0.0] * len(samples)
    for i, reward in zip(todo, scored, strict=True):
        rewards[i] = reward
    return rewards


def engines_on_every_rank(engine) -> bool:
    """True when every rank hosts part of an engine (vLLM external launcher): sampling is then a collective."""
    return (
        bool(getattr(engine, "external_launcher", False))
        and dist.is_initialized()
        and (dist.get_world_size() > 1)
    )


def generate_all(engine, prompt_ids: list, **sampling) -> list:
    """Every prompt's samples, in prompt order. With one engine per group of ranks (a collective then), engine
    i generates the i-th contiguous slice and the engines' leaders' samples are gathered to every rank; a
    prompt samples with the same seed whichever engine gets it."""
    if not engines_on_every_rank(engine):
        return engine.generate(prompt_ids, **sampling)
    lo, hi = slices(len(prompt_ids), engine.num_engines)[engine.engine_index]
    # An engine with an empty slice still calls generate: vLLM's data-parallel engines step together.
    local = engine.generate(prompt_ids[lo:hi], index_offset=lo, **sampling)
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local if engine.is_engine_leader else None)
    return [s for part in parts if part is not None for s in part]


def sample_and_score(engine, pool, problems, tokenizer, cfg, seed: int, n: int, temperature: float):
    """Samples and rewards. With engines on every rank this is a collective: every rank returns both (the
    rewards scored on rank 0, which holds the reward pool, and broadcast)."""
    prompt_ids = [
        render_prompt(p, tokenizer, cfg.data.prompt_template, cfg.data.instruction) for p in problems
    ]
    t0 = time.perf_counter()
    samples = generate_all(
        engine,
        prompt_ids,
        n=n,
        temperature=temperature,
        top_p=cfg.rollout.top_p,
        max_tokens=cfg.rollout.max_response_tokens,
        seed=seed,
    )
    t1 = time.perf_counter()
    rewards = None
    if pool is not None:
        rewards = score(pool, samples, [problems[s.prompt_index] for s in samples], cfg)
    if engines_on_every_rank(engine):
        box = [rewards]
        dist.broadcast_object_list(box, src=0)
        rewards = box[0]
    return samples, rewards, t1 - t0, time.perf_counter() - t1


def node_reward_times(seconds: list[float]) -> dict[str, float]:
    """Distributed scoring's time per node (`time_reward_s_node{i}`, i: the node's scorer, 0 = rank 0's), and
    the slowest and fastest: time_reward_s is at least the slowest, since rank 0 waits for every share."""
    times = {f"time_reward_s_node{i}": s for i, s in enumerate(seconds)}
    return {**times, "time_reward_s_node_max": max(seconds), "time_reward_s_node_min": min(seconds)}


def collect_rollouts(
    engine,
    pool,
    dataset,
    tokenizer,
    cfg,
    data_position: int,
    seed: int,
    removal: SolvedPromptRemoval | None = None,
) -> RolloutBatch:
    """One step's batch: `prompts_per_step` groups of `group_size` samples each.

    With dynamic sampling, groups whose rewards are all equal are dropped and refilled from further prompts
    (up to `max_refills` rounds), as DAPO/AceReason do, so every kept group carries a learning signal.
    With easy-prompt removal (`removal`), every scored group is recorded against its dataset row, and a batch
    that reaches an epoch's end takes the rest of its prompts from the next epoch in a further round.
    """
    g, want = cfg.rollout.group_size, cfg.rollout.prompts_per_step
    if isinstance(pool, DistributedScorer):
        pool.take_node_seconds()  # from here on: this batch's scoring only (not an evaluation's before it)
    kept_samples, kept_rewards, kept_answers_groups = [], [], 0
    seconds = {"rollout": 0.0, "reward": 0.0}
    generated = dropped = too_long = 0
    rounds = 0
    while kept_answers_groups < want:
        need = want - kept_answers_groups
        problems, data_position, skipped, rows = next_problems(
            dataset, data_position, need, tokenizer, cfg, removal
        )
        too_long += skipped
        samples, rewards, t_gen, t_reward = sample_and_score(
            engine, pool, problems, tokenizer, cfg, seed + rounds * 7919, g, cfg.rollout.temperature
        )
        seconds["rollout"] += t_gen
        seconds["reward"] += t_reward
        generated += len(samples)
        if removal is not None:
            for k, row in enumerate(rows):
                removal.record(row, rewards[k * g : (k + 1) * g])
        groups = range(len(problems))  # fewer than `need` where the epoch ended
        if cfg.grpo.dynamic_sampling and rounds < cfg.grpo.max_refills:
            groups = informative_groups(rewards, g)
            dropped += len(problems) - len(groups)
        for k in groups:
            kept_samples.extend(samples[k * g : (k + 1) * g])
            kept_rewards.extend(rewards[k * g : (k + 1) * g])
            kept_answers_groups += 1
            if kept_answers_groups == want:
                break
        rounds += 1
        if not cfg.grpo.dynamic_sampling and removal is None:
            break
    rewards_t = torch.tensor(kept_rewards, dtype=torch.float64)
    advantages = group_advantages(rewards_t, g, cfg.grpo.normalize_std)
    truncated = [s.finish_reason == "length" for s in kept_samples]
    lengths = [len(s.token_ids) for s in kept_samples]
    trained = loss_mask(lengths, truncated, cfg.grpo.overlong_filtering)
    stats = {
        "reward_mean": float(rewards_t.mean()),
        "accuracy": float((rewards_t > 0.5).double().mean()),
        "response_length_mean": sum(lengths) / len(lengths),
        "response_length_max": float(max(lengths)),
        "truncated_fraction": sum(truncated) / len(truncated),
        "samples_generated": float(generated),
        "groups_dropped": float(dropped),
        "prompts_too_long": float(too_long),
        "time_rollout_s": seconds["rollout"],
        "time_reward_s": seconds["reward"],
        **(removal.stats() if removal is not None else {}),
        **(node_reward_times(pool.take_node_seconds()) if isinstance(pool, DistributedScorer) else {}),
    }
    return RolloutBatch(
        prompts=[list(s.prompt_ids) for s in kept_samples],
        responses=[list(s.token_ids) for s in kept_samples],
        rollout_logprobs=[list(s.logprobs) for s in kept_samples],
        rewards=kept_rewards,
        truncated=truncated,
        advantages=advantages.tolist(),
        trained=trained,
        temperature=cfg.rollout.temperature,
        texts=[s.text for s in kept_samples],
        data_position=data_position,
        stats=stats,
    )
