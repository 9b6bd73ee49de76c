"""The training loops (RL and SFT), checkpointing and metrics."""
