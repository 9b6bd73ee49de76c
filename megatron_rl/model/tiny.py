"""A tiny Qwen2 checkpoint and a character-level tokenizer, built locally (no model hub).

The checkpoint is a regular HF directory (config.json, model.safetensors, tokenizer files with a chat
template) that transformers, vLLM and megatron-rl all load like a real one.
"""

from __future__ import annotations

import json
import string
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from megatron_rl.model.hf_config import Qwen2Config

# Single tokens for the structure of a reasoning answer, so the tiny model sees them as one unit each.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
STRUCTURE_TOKENS = ["<think>", "</think>", "\\boxed{"]
CHARACTERS = [c for c in string.printable if c not in "\t\r\x0b\x0c"]  # 95 printable ASCII + newline
# Qwen2's pre-tokenizer split (what Qwen2Tokenizer uses whatever the file says): words, single digits, runs of
# punctuation, newlines, spaces.
QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class TinyShape:
    hidden_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    num_key_value_heads: int = 1
    head_dim: int = 64  # vLLM's CPU attention rejects 16; 64 works
    intermediate_size: int = 512
    max_position_embeddings: int = 1024
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    initializer_range: float = 0.02  # std of the random init; tests raise it so logits are far from uniform


# The ~145M-parameter Qwen2 shape the benchmarks build next to the tiny one (145.0M parameters with the tiny
# tokenizer's 128-token vocabulary, so the parameters sit in the 12 layers).
QWEN2_145M = TinyShape(
    hidden_size=1024,
    num_hidden_layers=12,
    num_attention_heads=16,
    num_key_value_heads=4,
    head_dim=64,
    intermediate_size=3072,
)


def build_tokenizer():
    """A fast tokenizer with one token per character plus the structure tokens.

    It is Qwen2's byte-level BPE with no merges (whitespace as the byte-level symbols "Ġ" and "Ċ"): transformers
    loads the tokenizer of any checkpoint whose config says qwen2 as Qwen2Tokenizer, which replaces the
    pre-tokenizer and decoder with Qwen2's byte-level ones, so a plain per-character split would lose every
    space and newline in vLLM and in the trainer (checked: "Read a b" came back as "Readab")."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    symbols = [
        byte_level.pre_tokenize_str(c)[0][0] for c in CHARACTERS
    ]  # " " -> "Ġ", "\n" -> "Ċ", others as is
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + STRUCTURE_TOKENS + symbols)}
    core = Tokenizer(models.BPE(vocab, [], unk_token="<unk>"))
    core.normalizer = normalizers.NFC()
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(QWEN2_SPLIT), "isolated"), byte_level]
    )
    core.decoder = decoders.ByteLevel()
    # Structure tokens are matched before the split; they decode as text (not special).
    core.add_tokens(STRUCTURE_TOKENS)
    core.add_special_tokens(SPECIAL_TOKENS)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token="<unk>",
        bos_token=None,
        model_max_length=TinyShape.max_position_embeddings,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def padded_vocab_size(n: int, multiple: int = 64) -> int:
    """Round up so every tensor-parallel size up to `multiple` divides the vocabulary."""
    return (n + multiple - 1) // multiple * multiple


def tiny_vocab_size() -> int:
    """The padded vocabulary of `build_tokenizer()`'s tokenizer, counted without building it."""
    return padded_vocab_size(len(SPECIAL_TOKENS) + len(STRUCTURE_TOKENS) + len(CHARACTERS))


def tiny_qwen2_config(shape: TinyShape = TinyShape(), vocab_size: int | None = None) -> Qwen2Config:
    """The model shape a tiny checkpoint of `shape` has (no weights, no tokenizer, no transformers)."""
    return Qwen2Config(
        vocab_size=tiny_vocab_size() if vocab_size is None else vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=shape.max_position_embeddings,
        rope_theta=shape.rope_theta,
        rms_norm_eps=1e-6,
        tie_word_embeddings=shape.tie_word_embeddings,
    )


def write_tiny_checkpoint(out_dir: str | Path, shape: TinyShape = TinyShape(), seed: int = 0) -> Path:
    """Write config.json, model.safetensors, generation_config.json and the tokenizer to `out_dir`."""
    import transformers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    fields = asdict(tiny_qwen2_config(shape, vocab_size=padded_vocab_size(len(tok))))
    del fields["qkv_bias"]  # Qwen2 always has q/k/v biases; transformers' config has no such field
    config = transformers.Qwen2Config(
        **fields,
        initializer_range=shape.initializer_range,
        bos_token_id=None,
        eos_token_id=tok.convert_tokens_to_ids(EOS_TOKEN),
        pad_token_id=tok.convert_tokens_to_ids(PAD_TOKEN),
        torch_dtype="float32",
        architectures=["Qwen2ForCausalLM"],
    )
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(config).to(torch.float32)
    # HF's embedding leaves the pad token's row at zero (padding_idx) and the q/k/v biases start at zero, so a
    # sequence that starts with the pad token would keep an all-zero hidden state through every layer, where each
    # RMSNorm's backward multiplies by 1/sqrt(eps): gradients of ~1e27 at 12 layers (found by `bench update` on
    # random tokens). The pad row gets random values like every other token's.
    with torch.no_grad():
        model.get_input_embeddings().weight[config.pad_token_id].normal_(0.0, shape.initializer_range)
    model.save_pretrained(out, safe_serialization=True)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "megatron_rl_tiny.json").write_text(json.dumps({"shape": asdict(shape), "seed": seed}, indent=1))
    return out
