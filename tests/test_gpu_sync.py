"""On a GPU: the step's memory order (vLLM asleep, gradients freed, vLLM's weights woken, the streamed push,
then its KV cache) with a 7B-shaped model, and what the push costs the trainer's GPU memory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.distributed_helpers import run_distributed

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# Two decoder layers of DeepSeek-R1-Distill-Qwen-7B's shape (the tiny tokenizer's vocabulary): 466M parameters,
# 0.93 GB in bf16, tensors as large as the 7B model's.
SEVEN_B_LAYERS = dict(
    hidden_size=3584,
    num_hidden_layers=2,
    num_attention_heads=28,
    num_key_value_heads=4,
    head_dim=128,
    intermediate_size=18944,
)
BUCKET_BYTES = 256 << 20


def free_gib() -> float:
    torch.cuda.synchronize()
    return torch.cuda.mem_get_info()[0] / 2**30


def _memory_ordered_sync(rank: int, world: int, model_dir: str) -> None:
    from megatron_rl.distributed import ParallelLayout, init_distributed, shutdown
    from megatron_rl.model.policy import Policy
    from megatron_rl.rollout.vllm_engine import VLLMEngine
    from megatron_rl.rollout.weight_sync import WeightStream, tensor_checksum

    init_distributed(ParallelLayout(tp=1, pp=1), rank=rank, world_size=world)
    policy = Policy.from_hf(model_dir, params_dtype=torch.bfloat16)
    engine = VLLMEngine(
        model_dir, dtype="bfloat16", enable_sleep_mode=True, gpu_memory_utilization=0.3, enforce_eager=True
    )
    try:
        prompts = ["12+34=", "7*8="]
        before = engine.generate(prompts, n=2, temperature=1.0, max_tokens=16, seed=3)
        awake = free_gib()
        engine.sleep()
        asleep = free_gib()
        assert asleep > awake + 1.0, (awake, asleep)  # weights (0.93 GB) and the KV cache left the GPU

        # A training step's worth of gradient memory, then freed as the step loop does after the update.
        policy.zero_grads()
        assert policy.grad_buffer_bytes() > 1.8e9  # fp32 main grads of 466M parameters
        with_grads = free_gib()
        policy.release_grads()
        assert policy.grad_buffer_bytes() == 0 and free_gib() > with_grads + 1.5

        engine.wake_up(["weights"])
        weights_back = free_gib()
        with torch.no_grad():
            for p in policy.parameters():
                p.mul_(1.01)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        stream = WeightStream(policy.hf_manifest(), policy.hf_buckets(BUCKET_BYTES))
        report = engine.update_weights(stream)  # ipc: the bucket's CUDA buffer shared with the worker
        extra = torch.cuda.max_memory_allocated() - base
        largest = max(
            sum(t.numel() * t.element_size() for _, t in b) for b in policy.hf_buckets(BUCKET_BYTES)
        )
        # At most two exported buckets (at TP=1 mostly views of the parameters) and the transfer buffer.
        assert extra <= 3 * largest, (extra, largest)
        sent = {name: tensor_checksum(t) for b in policy.hf_buckets(BUCKET_BYTES) for name, t in b}
        assert report.checksums == sent and report.transport == "ipc"

        engine.wake_up(["kv_cache"])
        assert free_gib() < weights_back - 0.5  # the KV cache came back last
        after = engine.generate(prompts, n=2, temperature=1.0, max_tokens=16, seed=3)
        assert [s.logprobs for s in after] != [s.logprobs for s in before]
    finally:
        engine.shutdown()
        shutdown()


def test_step_memory_order_and_streamed_sync_of_a_7b_shaped_model(tmp_path: Path):
    from megatron_rl.model.tiny import TinyShape, write_tiny_checkpoint

    model_dir = write_tiny_checkpoint(tmp_path / "seven_b_layers", TinyShape(**SEVEN_B_LAYERS), seed=0)
    run_distributed(_memory_ordered_sync, 1, str(model_dir))
