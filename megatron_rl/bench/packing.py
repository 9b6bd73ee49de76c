"""Training-step throughput with sequence packing against padded batches, same run.

    python -m megatron_rl.bench.packing            # or: megatron-rl bench packing

For each model (the tiny one and a ~150M-parameter one, both built locally), one batch of prompt+response
lengths is drawn from an AceReason-like distribution (log-normal responses with a long tail, the overlong ones
truncated at the cap) scaled to the model's context. One training step is forward + backward of a token-level
policy-gradient loss over all micro-batches of that batch, done two ways on the same sequences:

- packed: `pack_microbatches` under `--budget-factor` x the longest possible sequence, THD forward;
- padded (to the batch's longest): the same sequences in rollout order, ceil(sequences / packed
  micro-batches) per micro-batch (the packed micro-batches' mean number of sequences), every sequence
  right-padded to the longest of the whole batch, as a trainer without packing collates a rollout batch
  (the unpacked `response_logprobs` path);
- micro-batch padded: the same micro-batches, each right-padded only to its own longest sequence (a
  stronger baseline: a padded trainer that trims each micro-batch).

Each is timed as the median over `--reps` steps, after one warm-up step each, the two ways interleaved so
that changes in machine load hit both alike. tokens/s counts real (prompt + response) tokens, so the ratio
is the ratio of step times. The last line printed is one JSON object with real_token_fraction (real tokens
over all tokens of the packed micro-batches), budget_fill (real tokens over micro-batches x budget),
speedup_vs_padded and speedup_vs_microbatch_padded, each the smallest over the models, then per-model details.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import torch

from megatron_rl.algo.logprobs import response_logprobs
from megatron_rl.algo.packing import pack_microbatches, pack_values
from megatron_rl.bench.common import announce_device, load_average
from megatron_rl.model.tiny import QWEN2_145M, TinyShape


@dataclass(frozen=True)
class BenchModel:
    name: str
    shape: TinyShape
    num_samples: int
    max_prompt: int
    max_response: int


MODELS = {
    "tiny": BenchModel("tiny", TinyShape(), num_samples=64, max_prompt=32, max_response=992),
    "150m": BenchModel("150m", QWEN2_145M, num_samples=16, max_prompt=16, max_response=240),
}


def acereason_like_lengths(
    n: int, max_prompt: int, max_response: int, seed: int = 0
) -> tuple[list[int], list[int]]:
    """(prompt lengths, response lengths) shaped like AceReason rollouts, scaled to `max_response`.

    Responses: log-normal with median 0.3 x the cap and sigma 0.9, so most are a few tenths of the cap, a
    long tail reaches it and ~9% are truncated at it (overlong). Prompts: short, log-normal around a third
    of `max_prompt`.
    """
    gen = torch.Generator().manual_seed(seed)

    def lognormal(median: float, sigma: float) -> torch.Tensor:
        return torch.exp(math.log(median) + sigma * torch.randn(n, generator=gen, dtype=torch.float64))

    prompts = lognormal(max_prompt / 3, 0.5).round().clamp(4, max_prompt).long()
    responses = lognormal(0.3 * max_response, 0.9).round().clamp(1, max_response).long()
    return prompts.tolist(), responses.tolist()


def padded_batches(n: int, num_microbatches: int) -> list[list[int]]:
    per = math.ceil(n / num_microbatches)
    return [list(range(i, min(i + per, n))) for i in range(0, n, per)]


def bench_model(spec: BenchModel, budget_factor: float, reps: int, seed: int, workdir: str) -> dict:
    from megatron_rl.model.policy import Policy, packed_forward_logprobs
    from megatron_rl.model.tiny import write_tiny_checkpoint

    max_len = spec.max_prompt + spec.max_response
    shape = replace(spec.shape, max_position_embeddings=max(1024, max_len), initializer_range=0.02)
    model_dir = write_tiny_checkpoint(os.path.join(workdir, spec.name), shape, seed=seed)
    policy = Policy.from_hf(model_dir)
    model = policy.model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    num_params = sum(p.numel() for p in params)
    vocab = policy.cfg.vocab_size

    prompt_lens, response_lens = acereason_like_lengths(
        spec.num_samples, spec.max_prompt, spec.max_response, seed
    )
    gen = torch.Generator().manual_seed(seed + 1)
    prompts = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in prompt_lens]
    responses = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in response_lens]
    advantages = torch.randn(spec.num_samples, generator=gen).tolist()
    real_tokens = sum(prompt_lens) + sum(response_lens)
    response_tokens = sum(response_lens)
    budget = int(budget_factor * max_len)
    temperature = 1.0

    mbs = pack_microbatches(prompts, responses, budget)
    padded = padded_batches(spec.num_samples, len(mbs))
    lengths = [p + r for p, r in zip(prompt_lens, response_lens, strict=True)]
    longest = max(lengths)
    batch_padded_tokens = len(lengths) * longest
    padded_tokens = sum(len(b) * max(lengths[i] for i in b) for b in padded)
    # For reference (not timed): a padded trainer sized for the worst case fits only budget // max_len
    # sequences per micro-batch; its padding, counted the same way.
    per_mb = max(1, budget // max_len)
    capped = [list(range(i, min(i + per_mb, len(lengths)))) for i in range(0, len(lengths), per_mb)]
    capped_tokens = sum(len(b) * max(lengths[i] for i in b) for b in capped)

    def packed_step() -> float:
        model.zero_grad(set_to_none=True)
        total = 0.0
        for mb in mbs:
            lp, ent = packed_forward_logprobs(model, mb, temperature, policy.tp_group)
            # Token-level loss normalised by the batch's response tokens, as the trainer does.
            loss = (-(lp * pack_values(advantages, mb)).sum() - 1e-3 * ent.sum()) / response_tokens
            loss.backward()
            total += loss.item()
        return total

    def padded_step(pad_to: int = 0) -> float:
        model.zero_grad(set_to_none=True)
        total = 0.0
        for b in padded:
            lps, ents = response_logprobs(
                model,
                [prompts[i] for i in b],
                [responses[i] for i in b],
                temperature,
                policy.tp_group,
                pad_to=pad_to,
            )
            per_sample = zip(b, lps, ents, strict=True)
            loss = sum(-(lp * advantages[i]).sum() - 1e-3 * ent.sum() for i, lp, ent in per_sample)
            loss = loss / response_tokens
            loss.backward()
            total += loss.item()
        return total

    ways = {
        "packed": packed_step,
        "padded": lambda: padded_step(pad_to=longest),
        "microbatch_padded": padded_step,
    }
    for step in ways.values():  # warm-up: one full step each way (the allocator sees every shape once)
        step()
    wall: dict[str, list[float]] = {name: [] for name in ways}
    cpu: dict[str, list[float]] = {name: [] for name in ways}
    losses: dict[str, float] = {}
    for _ in range(reps):  # the ways alternate so that drift in machine load hits them alike
        for name, step in ways.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            losses[name] = step()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    median = {name: statistics.median(times) for name, times in wall.items()}
    median_cpu = {name: statistics.median(times) for name, times in cpu.items()}
    packed_s, padded_s, mb_padded_s = median["packed"], median["padded"], median["microbatch_padded"]
    return {
        "model": spec.name,
        "params": num_params,
        "shape": {**asdict(shape), "vocab_size": vocab},
        "num_sequences": spec.num_samples,
        "max_prompt": spec.max_prompt,
        "max_response": spec.max_response,
        "mean_sequence_length": round(real_tokens / spec.num_samples, 1),
        "truncated_fraction": round(sum(n == spec.max_response for n in response_lens) / spec.num_samples, 3),
        "real_tokens": real_tokens,
        "max_tokens_per_microbatch": budget,
        "packed_microbatches": len(mbs),
        "packed_tokens": sum(mb.num_tokens for mb in mbs),
        "real_token_fraction": round(real_tokens / sum(mb.num_tokens for mb in mbs), 4),
        "budget_fill": round(real_tokens / (len(mbs) * budget), 4),
        "padded_microbatches": len(padded),
        "padded_sequences_per_microbatch": len(padded[0]),
        "padded_tokens": batch_padded_tokens,
        "padded_real_token_fraction": round(real_tokens / batch_padded_tokens, 4),
        "microbatch_padded_tokens": padded_tokens,
        "microbatch_padded_real_token_fraction": round(real_tokens / padded_tokens, 4),
        "worst_case_padded_sequences_per_microbatch": per_mb,
        "worst_case_padded_real_token_fraction": round(real_tokens / capped_tokens, 4),
        "packed_step_s": round(packed_s, 3),
        "padded_step_s": round(padded_s, 3),
        "microbatch_padded_step_s": round(mb_padded_s, 3),
        "packed_tokens_per_s": round(real_tokens / packed_s, 1),
        "padded_tokens_per_s": round(real_tokens / padded_s, 1),
        "microbatch_padded_tokens_per_s": round(real_tokens / mb_padded_s, 1),
        "speedup_vs_padded": round(padded_s / packed_s, 3),
        "speedup_vs_microbatch_padded": round(mb_padded_s / packed_s, 3),
        # CPU seconds of this process (all its threads): less sensitive to other load on a shared machine.
        "packed_step_cpu_s": round(median_cpu["packed"], 3),
        "padded_step_cpu_s": round(median_cpu["padded"], 3),
        "microbatch_padded_step_cpu_s": round(median_cpu["microbatch_padded"], 3),
        "speedup_vs_padded_cpu_time": round(median_cpu["padded"] / median_cpu["packed"], 3),
        "speedup_vs_microbatch_padded_cpu_time": round(
            median_cpu["microbatch_padded"] / median_cpu["packed"], 3
        ),
        "loss_abs_diff": max(abs(losses["packed"] - losses[name]) for name in ways),
        "reps": reps,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megatron-rl bench packing", description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["tiny", "150m"])
    parser.add_argument("--reps", type=int, default=5, help="timed steps per way (median), after one warm-up")
    parser.add_argument("--budget-factor", type=float, default=2.0, help="token budget / longest sequence")
    parser.add_argument("--num-samples", type=int, default=None, help="override each model's batch size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        # On a machine shared with other jobs, one thread avoids timing the other thread's waits.
        torch.set_num_threads(args.threads)

    from megatron_rl.distributed import ParallelLayout, init_distributed, shutdown

    device, _ = announce_device()
    print(
        "padded = the same sequences in rollout order, ceil(n / packed micro-batches) per micro-batch, padded "
        "to the batch's longest sequence; micro-batch padded = the same, each micro-batch padded only to its "
        "own longest; tokens/s counts real (prompt + response) tokens",
        flush=True,
    )
    init_distributed(ParallelLayout(tp=1, pp=1))
    results = []
    try:
        with tempfile.TemporaryDirectory(prefix="packing_bench_") as workdir:
            for name in args.models:
                spec = MODELS[name]
                if args.num_samples:
                    spec = replace(spec, num_samples=args.num_samples)
                r = bench_model(spec, args.budget_factor, args.reps, args.seed, workdir)
                results.append(r)
                print(_summary_line(r), flush=True)
    finally:
        shutdown()
    summary = {
        "benchmark": "packing",
        "device": device,
        # The smallest over the models: the figures the targets are checked against.
        "real_token_fraction": min(r["real_token_fraction"] for r in results),
        "budget_fill": min(r["budget_fill"] for r in results),
        "speedup_vs_padded": min(r["speedup_vs_padded"] for r in results),
        "speedup_vs_microbatch_padded": min(r["speedup_vs_microbatch_padded"] for r in results),
        "load_average_1min_at_end": load_average(),
        "results": results,
    }
    print(json.dumps(summary), flush=True)
    return 0


def _summary_line(r: dict) -> str:
    return (
        f"{r['model']} ({r['params'] / 1e6:.1f}M params): {r['num_sequences']} sequences, mean "
        f"{r['mean_sequence_length']} tokens, max {r['max_prompt'] + r['max_response']}\n"
        f"  packed: {r['packed_microbatches']} micro-batches <= {r['max_tokens_per_microbatch']} tokens, "
        f"real {r['real_token_fraction']:.1%} of their tokens (budget fill {r['budget_fill']:.1%}), "
        f"step {r['packed_step_s']} s, {r['packed_tokens_per_s']} tok/s\n"
        f"  padded to the batch's longest: {r['padded_microbatches']} x "
        f"{r['padded_sequences_per_microbatch']} sequences, real {r['padded_real_token_fraction']:.1%} of "
        f"their tokens, step {r['padded_step_s']} s, {r['padded_tokens_per_s']} tok/s\n"
        f"  micro-batch padded: real {r['microbatch_padded_real_token_fraction']:.1%} of their tokens, "
        f"step {r['microbatch_padded_step_s']} s, {r['microbatch_padded_tokens_per_s']} tok/s (not timed: at "
        f"{r['worst_case_padded_sequences_per_microbatch']} sequences per micro-batch, the most that fit the "
        f"budget at the maximum length, real {r['worst_case_padded_real_token_fraction']:.1%})\n"
        f"  speedup {r['speedup_vs_padded']}x wall ({r['speedup_vs_padded_cpu_time']}x CPU time) vs padded, "
        f"{r['speedup_vs_microbatch_padded']}x ({r['speedup_vs_microbatch_padded_cpu_time']}x) vs micro-batch "
        f"padded; "
        f"|loss packed - padded| = {r['loss_abs_diff']:.1e}"
    )


if __name__ == "__main__":
    raise SystemExit(main())
