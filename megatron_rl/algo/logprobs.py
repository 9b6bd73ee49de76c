"""Per-token log-probs and entropies of response tokens under the policy, at the sampling temperature."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kernels import logprob_entropy
from megatron_rl.distributed import device


def right_padded(sequences: Sequence[Sequence[int]], pad_id: int = 0, pad_to: int = 0) -> torch.Tensor:
    longest = max(pad_to, *(len(s) for s in sequences))
    out = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    for i, s in enumerate(sequences):
        out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


def response_logprobs(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    temperature: float,
    tp_group=None,
    pad_to: int = 0,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Log p(response token) and entropy at each response position, one [len(response)] tensor per sample.

    A plain padded forward (causal attention makes right padding harmless); the trainer's packed path
    computes the same thing without padding. `pad_to` pads to at least that length (e.g. the batch's longest).
    """
    full = [list(p) + list(r) for p, r in zip(prompts, responses, strict=True)]
    tokens = right_padded(full, pad_to=pad_to).to(device())
    positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    logits = model(input_ids=tokens, position_ids=positions, attention_mask=None)  # [B, S, V/TP]
    targets = torch.full_like(tokens, -100)
    targets[:, :-1] = tokens[:, 1:]
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        targets[i, : len(p) - 1] = -100  # only response tokens are scored
        targets[i, len(p) + len(r) - 1 :] = -100
    lp, ent = logprob_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), temperature, tp_group=tp_group
    )
    lp, ent = lp.view_as(tokens), ent.view_as(tokens)
    out_lp, out_ent = [], []
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        span = slice(len(p) - 1, len(p) - 1 + len(r))
        out_lp.append(lp[i, span])
        out_ent.append(ent[i, span])
    return out_lp, out_ent
