"""The rollout temperature of each RL step: the configured number, or (`rollout.temperature: auto`) the one
whose temperature-adjusted entropy on a probe batch is nearest a target.

AceReason-Nemotron 1.1 (arXiv:2506.13284) sets the RL sampling temperature so that the mean token entropy of
the policy at that temperature, over the responses it samples at that temperature, stays near 0.3. Here a
probe at temperature T samples a fixed set of training prompts from the rollout engine at T and has the
trainer compute the mean entropy of softmax(logits / T) over the sampled response tokens (the figure the loss
logs as `entropy_mean`). Entropy rises with T, so the search brackets the target between the bounds and
interpolates inside the bracket; every probe reuses the same prompts and seed, so probes differ only by T.
The choice is made before the first RL step and again every `every` steps, and is used for sampling and for
the loss alike.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sized
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

from megatron_rl.algo.packing import pack_microbatches
from megatron_rl.config import Config
from megatron_rl.data.prompts import render_prompt
from megatron_rl.train.rollouts import generate_all, next_problems

if TYPE_CHECKING:
    from megatron_rl.data.arithmetic import ArithmeticTask
    from megatron_rl.data.dataset import Problem, PromptDataset
    from megatron_rl.model.policy import Policy
    from megatron_rl.rollout.base import RolloutEngine

    Dataset = PromptDataset | ArithmeticTask

log = logging.getLogger(__name__)

STATE_KEY = "rollout_temperature"  # in the checkpoint's loop state, so that a resumed run keeps the choice
PROBE_SEED = 7_777_777  # probes sample with seeds of their own, apart from the steps' rollouts
PROBE_STRIDE = 1009  # an endless synthetic task: probe prompts are every 1009th training prompt
TINY = 1e-6  # the least entropy taken for its logarithm (a probe may sample only certain tokens)


@dataclass(frozen=True)
class Probe:
    temperature: float
    entropy: float


def search_temperature(
    measure: Callable[[float], float],
    target: float,
    bounds: tuple[float, float],
    start: float,
    max_probes: int,
    tolerance: float,
) -> tuple[Probe, list[Probe]]:
    """The probe whose entropy is nearest `target`, and every probe in the order made, calling `measure(T)`
    at most `max_probes` times for T within `bounds`, assuming entropy rises with T.

    The first probe is at `start` (clamped into the bounds). Until the target is bracketed, the next probe is
    the bound on the target's side; a bound that still misses the target ends the search (it is the nearest
    reachable). Once bracketed, the next probe interpolates log(entropy) linearly in T between the closest
    probes below and above the target (entropy grows about exponentially with T on the tiny model), kept a
    tenth of the bracket away from its ends; when the last two probes fell on the same side of the target, it
    halves the bracket instead. A probe within `tolerance` ends the search.
    """
    low, high = bounds
    probes: list[Probe] = []
    t = min(max(start, low), high)
    while len(probes) < max_probes:
        probes.append(Probe(t, measure(t)))
        if abs(probes[-1].entropy - target) <= tolerance:
            break
        below = [p for p in probes if p.entropy < target]
        above = [p for p in probes if p.entropy >= target]
        if not below:  # too hot everywhere probed: go to the low end
            if t == low:
                break
            t = low
            continue
        if not above:
            if t == high:
                break
            t = high
            continue
        # The closest probes below and above the target; every probe after the bracket formed lies between
        # them, so a is at the lower temperature.
        a = max(below, key=lambda p: p.entropy)
        b = min(above, key=lambda p: p.entropy)
        if len(probes) >= 2 and (probes[-1].entropy < target) == (probes[-2].entropy < target):
            t = (a.temperature + b.temperature) / 2
            continue
        log_a, log_b = math.log(max(a.entropy, TINY)), math.log(b.entropy)
        t = a.temperature + (math.log(target) - log_a) * (b.temperature - a.temperature) / (log_b - log_a)
        margin = 0.1 * (b.temperature - a.temperature)
        t = min(max(t, a.temperature + margin), b.temperature - margin)
    best = min(probes, key=lambda p: abs(p.entropy - target))
    return best, probes


def probe_problems(dataset: Dataset, count: int, tokenizer: Any, cfg: Config) -> list[Problem]:
    """`count` fixed training prompts spread over the dataset (a file: every len/count-th row; the endless
    synthetic task: every PROBE_STRIDE-th), each the first from its position that fits max_prompt_tokens."""
    stride = max(1, len(dataset) // count) if isinstance(dataset, Sized) else PROBE_STRIDE
    return [next_problems(dataset, i * stride, 1, tokenizer, cfg)[0][0] for i in range(count)]


def _from_driver(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def probe_entropy(
    policy: Policy,
    engine: RolloutEngine | None,
    prompt_ids: list[list[int]] | None,
    temperature: float,
    cfg: Config,
    seed: int,
) -> float:
    """Mean entropy at `temperature` of the response tokens the engine samples at `temperature` for
    `prompt_ids` (rollout.auto_temperature.probe_samples each). A collective: the engine's ranks sample (the
    others pass engine None), every rank takes part in the trainer's forward pass, all return the figure."""
    samples = None
    if engine is not None:
        samples = generate_all(
            engine,
            prompt_ids,
            n=cfg.rollout.auto_temperature.probe_samples,
            temperature=temperature,
            top_p=cfg.rollout.top_p,
            max_tokens=cfg.rollout.max_response_tokens,
            seed=seed,
        )
        samples = ([list(s.prompt_ids) for s in samples], [list(s.token_ids) for s in samples])
    prompts, responses = _from_driver(samples)
    if engine is not None:
        engine.sleep()  # colocated on a GPU: the trainer's forward pass gets the memory, as in the update
    microbatches = pack_microbatches(
        prompts,
        responses,
        cfg.grpo.max_tokens_per_microbatch,
        dp_size=policy.dp_size,
        dp_rank=policy.dp_rank,
    )
    per_microbatch = policy.forward_logprobs(microbatches, temperature)  # [] off the last pipeline stage
    sums = {
        "entropy_sum": float(sum(entropy.double().sum() for _, entropy in per_microbatch)),
        "tokens": float(sum(mb.num_response_tokens for mb in microbatches)) if policy.is_last_stage else 0.0,
    }
    totals = policy.batch_totals(sums)
    if engine is not None:
        engine.wake_up()
    return totals["entropy_sum"] / max(1.0, totals["tokens"])


class RolloutTemperature:
    """The temperature of each RL step's rollouts and loss. A number in the config is used as it is (the
    config itself is handed on); with `auto` it is chosen before the first step, every `every` steps after,
    and when a resumed run's checkpoint does not hold one."""

    def __init__(
        self,
        cfg: Config,
        policy: Policy,
        engine: RolloutEngine | None,
        dataset: Dataset,
        tokenizer: Any,
        train_state: dict,
    ) -> None:
        self.cfg, self.policy, self.engine = cfg, policy, engine
        self.dataset, self.tokenizer = dataset, tokenizer
        self.auto = cfg.rollout.temperature == "auto"
        self.current: float | None = train_state.get(STATE_KEY) if self.auto else cfg.rollout.temperature
        self.choice_metrics: dict[str, float] = {}  # the latest choice's figures, logged with its step
        self._prompt_ids: list | None = None

    def due(self, step: int) -> bool:
        every = self.cfg.rollout.auto_temperature.every
        return self.auto and (self.current is None or (every > 0 and (step - 1) % every == 0))

    def config_for(self, step: int) -> Config:
        """The config of RL step `step` (1-based): with `auto`, a copy whose rollout.temperature is the number
        chosen (again, when due: a collective then, the engine holding the current weights)."""
        self.choice_metrics = {}
        if self.due(step):
            self.choose(step)
        if not self.auto:
            return self.cfg
        rollout = self.cfg.rollout.model_copy(update={"temperature": self.current})
        return self.cfg.model_copy(update={"rollout": rollout})

    def choose(self, step: int) -> float:
        """Search the bounds for the temperature nearest the target entropy; logs every probe and the choice."""
        auto = self.cfg.rollout.auto_temperature
        started = time.perf_counter()
        if self.engine is not None and self._prompt_ids is None:
            problems = probe_problems(self.dataset, auto.probe_prompts, self.tokenizer, self.cfg)
            self._prompt_ids = [
                render_prompt(p, self.tokenizer, self.cfg.data.prompt_template, self.cfg.data.instruction)
                for p in problems
            ]
        seed = self.cfg.run.seed * 1_000_003 + step * 10_007 + PROBE_SEED

        say = log.info if dist.get_rank() == 0 else log.debug  # every rank gets the same figures

        def measure(temperature: float) -> float:
            entropy = probe_entropy(self.policy, self.engine, self._prompt_ids, temperature, self.cfg, seed)
            say("temperature probe before step %d: T=%.4f entropy %.4f", step, temperature, entropy)
            return entropy

        start = self.current if self.current is not None else sum(auto.bounds) / 2
        best, probes = search_temperature(
            measure, auto.target_entropy, auto.bounds, start, auto.max_probes, auto.tolerance
        )
        self.current = best.temperature
        say(
            "rollout temperature %.4f from step %d: probe entropy %.4f, target %.3f (%d probes)",
            best.temperature,
            step,
            best.entropy,
            auto.target_entropy,
            len(probes),
        )
        self.choice_metrics = {
            "temperature_probe_entropy": best.entropy,
            "temperature_probes": float(len(probes)),
            "time_temperature_s": time.perf_counter() - started,
        }
        return best.temperature

    def metrics(self) -> dict[str, float]:
        """`temperature` every step, and the probes' figures on a step that chose it."""
        return {"temperature": float(self.current), **self.choice_metrics}

    def state(self) -> dict[str, float]:
        """What the checkpoint keeps (the chosen temperature, with `auto`)."""
        return {STATE_KEY: self.current} if self.auto else {}
