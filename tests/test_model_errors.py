"""Bad checkpoints and parallel sizes give a one-line error naming the tensor or field."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_rl.model.convert import SafetensorsCheckpoint
from megatron_rl.model.hf_config import ModelConfigError, check_hf_tensors, load_hf_config


def _copy_with(tiny_ckpt, tmp_path, edit) -> str:
    out = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, out)
    tensors = load_file(out / "model.safetensors")
    edit(tensors)
    save_file(tensors, out / "model.safetensors")
    return str(out)


def _check(model_dir: str) -> None:
    cfg = load_hf_config(model_dir)
    check_hf_tensors(SafetensorsCheckpoint(model_dir).shapes(), cfg, model_dir)


def test_missing_tensor_is_named(tiny_ckpt, tmp_path):
    bad = _copy_with(tiny_ckpt, tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ModelConfigError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        _check(bad)


def test_extra_tensor_is_named(tiny_ckpt, tmp_path):
    bad = _copy_with(tiny_ckpt, tmp_path, lambda t: t.update({"model.layers.9.foo": torch.zeros(2)}))
    with pytest.raises(ModelConfigError, match=r"unexpected tensor 'model\.layers\.9\.foo'"):
        _check(bad)


def test_misshaped_tensor_is_named(tiny_ckpt, tmp_path):
    def shrink(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:32]

    bad = _copy_with(tiny_ckpt, tmp_path, shrink)
    with pytest.raises(
        ModelConfigError, match=r"'model\.layers\.0\.self_attn\.k_proj\.weight' has shape \[32, 128\]"
    ):
        _check(bad)


def test_unsupported_architecture_names_field(tiny_ckpt, tmp_path):
    out = tmp_path / "llama"
    shutil.copytree(tiny_ckpt, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelConfigError, match="'architectures'.*LlamaForCausalLM"):
        load_hf_config(out)


def test_tp_not_dividing_heads_names_field(tiny_ckpt):
    with pytest.raises(
        ModelConfigError, match="tensor_parallel_size=3 does not divide num_attention_heads=2"
    ):
        load_hf_config(tiny_ckpt).check_parallel(3, 1)


def test_sharded_checkpoint_with_index_loads(tiny_ckpt, tmp_path):
    out = tmp_path / "sharded"
    shutil.copytree(tiny_ckpt, out)
    tensors = load_file(out / "model.safetensors")
    (out / "model.safetensors").unlink()
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, group in halves.items():
        save_file({n: tensors[n] for n in group}, out / file)
        weight_map.update({n: file for n in group})
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    ckpt = SafetensorsCheckpoint(out)
    _check(str(out))
    assert torch.equal(ckpt.get(names[3]), tensors[names[3]])


def test_cli_reports_one_line_error(tiny_ckpt):
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_rl.cli", "verify-sync", "--model", tiny_ckpt, "--tp", "3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("error:")]
    assert lines == ["error: tensor_parallel_size=3 does not divide num_attention_heads=2"], proc.stderr
