"""The RL math: log-probs from vocab-parallel logits, advantages, losses, packing."""
