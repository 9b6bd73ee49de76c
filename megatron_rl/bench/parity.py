"""How closely the trainer's log-probs match vLLM's, and how close each is to the exact value.

    python -m megatron_rl.bench.parity --model RUN_DIR/final_model     # or: megatron-rl bench parity ...

vLLM samples `--samples` responses to each of `--prompts` held-out arithmetic prompts (the demo's task) at
`--temperature`; for every sampled token three log-probs are compared: vLLM's (what it sampled with), the
Megatron policy's recomputation (the trainer's path: packed forward, fused log-prob kernel), both in the
model's dtype, and a float64 reference (transformers' Qwen2 in float64 on the same weights), the baseline
that says how far each side is from the exact value. The differences are also split by how unlikely the
sampled token was (|log-prob| ranges). Without --model it builds the tiny test model.

Prints the device, a markdown table and, last, one JSON line with the results.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Sequence

import torch

from megatron_rl.bench.common import announce_device

RANGES = ((0.0, 1.0), (1.0, 5.0), (5.0, 20.0), (20.0, float("inf")))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="megatron-rl bench parity", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="HF checkpoint directory (default: the tiny test model, built here)")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--samples", type=int, default=8, help="responses per prompt")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def fp64_logprobs(model_dir: str, samples, temperature: float) -> list[torch.Tensor]:
    """The sampled tokens' log-probs from transformers' Qwen2 in float64 (the exact value, for fp32 inputs)."""
    from transformers import Qwen2ForCausalLM

    hf = Qwen2ForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    out = []
    with torch.no_grad():
        for s in samples:
            ids = torch.tensor([s.prompt_ids + s.token_ids])
            logits = hf(ids).logits[0, len(s.prompt_ids) - 1 : -1] / temperature
            out.append(torch.log_softmax(logits, -1).gather(-1, torch.tensor(s.token_ids)[:, None])[:, 0])
    return out


def summary(diff: torch.Tensor) -> dict[str, float]:
    return {"max": float(diff.max()), "p99": float(diff.quantile(0.99)), "mean": float(diff.mean())}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from megatron_rl.algo.logprobs import response_logprobs
    from megatron_rl.data.arithmetic import ArithmeticTask
    from megatron_rl.distributed import ParallelLayout, init_distributed, shutdown
    from megatron_rl.model.policy import Policy
    from megatron_rl.model.tiny import TinyShape, write_tiny_checkpoint
    from megatron_rl.rollout.vllm_engine import VLLMEngine

    device, load = announce_device()
    scratch = tempfile.TemporaryDirectory()
    model_dir = args.model or str(
        write_tiny_checkpoint(scratch.name, TinyShape(initializer_range=0.1), seed=args.seed)
    )
    init_distributed(ParallelLayout(tp=1, pp=1), rank=0, world_size=1)
    policy = Policy.from_hf(model_dir)
    policy.eval()
    engine = VLLMEngine(model_dir, seed=args.seed, in_process=True)
    task = ArithmeticTask(seed=args.seed, digits=3, eval_size=args.prompts)
    prompts = [engine.tokenizer.encode(p.prompt, add_special_tokens=False) for p in task.eval_set()]
    samples = engine.generate(
        prompts, n=args.samples, temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed
    )
    engine.shutdown()
    with torch.no_grad():
        trainer, _ = response_logprobs(
            policy.model, [s.prompt_ids for s in samples], [s.token_ids for s in samples], args.temperature
        )
    shutdown()
    vllm = torch.cat([torch.tensor(s.logprobs, dtype=torch.float64) for s in samples])
    train = torch.cat([t.double().cpu() for t in trainer])
    exact = torch.cat(fp64_logprobs(model_dir, samples, args.temperature))
    pairs = {"vllm_vs_trainer": vllm - train, "vllm_vs_fp64": vllm - exact, "trainer_vs_fp64": train - exact}
    results = {name: summary(d.abs()) for name, d in pairs.items()}
    by_range = []
    for lo, hi in RANGES:
        mask = (-exact >= lo) & (-exact < hi)
        if mask.any():
            row = {"range": [lo, hi], "tokens": int(mask.sum())}
            row.update({name: float(d.abs()[mask].max()) for name, d in pairs.items()})
            by_range.append(row)

    print(
        f"\n{len(samples)} samples, {exact.numel()} tokens, temperature {args.temperature}, model {model_dir}\n"
    )
    print("| pair | max abs diff | p99 | mean |\n|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['max']:.3g} | {r['p99']:.3g} | {r['mean']:.3g} |")
    print(
        "\n| sampled token's -log p | tokens | max vLLM vs trainer | max vLLM vs fp64 | max trainer vs fp64 |"
    )
    print("|---|---|---|---|---|")
    for row in by_range:
        lo, hi = row["range"]
        print(
            f"| [{lo:g}, {hi:g}) | {row['tokens']} | {row['vllm_vs_trainer']:.3g} | {row['vllm_vs_fp64']:.3g} "
            f"| {row['trainer_vs_fp64']:.3g} |"
        )
    record = {
        "device": device,
        "load_average": load,
        "model": model_dir,
        "tokens": exact.numel(),
        "temperature": args.temperature,
        "abs_diff": results,
        "by_logprob_range": by_range,
    }
    print(json.dumps(record))
    scratch.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
