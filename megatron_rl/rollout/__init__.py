"""Rollout engines: the interface the trainer uses, and its vLLM implementation (the only vllm importer)."""

from megatron_rl.rollout.base import RolloutEngine, RolloutSample, SyncReport, WeightSyncError

__all__ = ["RolloutEngine", "RolloutSample", "SyncReport", "WeightSyncError"]
