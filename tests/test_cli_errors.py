"""`megatron-rl train`: the project's own errors end in one line; any other error keeps its traceback. An
error a remote rollout engine reports reaches the trainer as the same type.

In-process (the trainer itself is replaced), so no model is built and nothing is trained.
"""

from __future__ import annotations

import threading
from multiprocessing import Pipe

import pytest
from typer.testing import CliRunner

import megatron_rl.train.rl
from megatron_rl.cli import _run_training, app
from megatron_rl.config import ConfigError, PlacementError
from megatron_rl.rollout.remote import RemoteEngine, error_reply


def _raising(error: Exception):
    def train(cfg, resume=False):
        raise error

    return train


def test_a_plain_value_error_from_training_keeps_its_traceback(monkeypatch, tmp_path):
    monkeypatch.setattr(megatron_rl.train.rl, "train", _raising(ValueError("a bug deep in training")))
    with pytest.raises(ValueError, match="a bug deep in training") as raised:
        _run_training(None, [f"run.output_dir={tmp_path}"], resume=False)
    assert type(raised.value) is ValueError  # not typer.Exit: the error is not turned into a one-liner
    assert raised.traceback[-1].name == "train"  # the traceback reaches where it was raised

    result = CliRunner().invoke(app, ["train", f"run.output_dir={tmp_path}"])
    assert type(result.exception) is ValueError and result.exit_code == 1
    assert "error:" not in result.stderr


@pytest.mark.parametrize(
    "error",
    [
        ConfigError("config key 'data.train_path' is required when data.source is 'file'"),
        PlacementError(
            "world size 3 is not a multiple of tensor_parallel_size * pipeline_parallel_size = 2 * 1"
        ),
    ],
)
def test_a_config_error_from_training_is_one_line(monkeypatch, tmp_path, error):
    monkeypatch.setattr(megatron_rl.train.rl, "train", _raising(error))
    result = CliRunner().invoke(app, ["train", f"run.output_dir={tmp_path}"])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines()[-1] == f"error: {error}"
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    "error", [ConfigError("config key 'x.y': no"), PlacementError("world size 3"), ValueError("v")]
)
def test_an_error_a_remote_engine_reports_is_raised_again_as_its_type(error):
    """A config a rollout engine server refuses (placement=separate) is the same one-line error at the trainer."""
    engine = RemoteEngine.__new__(RemoteEngine)  # only the wire, no server
    server_end, engine._conn = Pipe()
    engine._lock, engine.address = threading.Lock(), ("node7", 40000)
    server_end.send(error_reply(error))
    with pytest.raises(type(error)) as raised:
        engine._request("generate")
    assert type(raised.value) is type(error) and str(raised.value) == str(error)
    assert server_end.recv() == ("generate", (), {})
