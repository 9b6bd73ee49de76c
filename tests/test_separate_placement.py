"""rollout.placement=separate: the trainer drives vLLM engines that run in processes of their own
(`megatron-rl serve-rollout`, as on separate nodes), found through a rendezvous directory.

Two engine servers and a one-rank trainer on this machine: the step's prompts are split over both engines,
weights reach both after every step by the broadcast transport (gloo here, NCCL on GPUs), and the trainer's
log-probs match the ones each engine sampled with. When the run ends the servers exit cleanly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

QUICK = [
    "run.reward_workers=1", "run.tensorboard=false", "sft.enabled=false", "data.synthetic_digits=1",
    "data.synthetic_eval_size=8", "rollout.prompts_per_step=4", "rollout.group_size=2",
    "rollout.max_response_tokens=16", "eval.samples_per_problem=1",
]  # fmt: skip


def test_trainer_drives_two_engine_servers(tmp_path):
    rendezvous = tmp_path / "engines"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    servers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "megatron_rl.cli",
                "serve-rollout",
                "--rendezvous",
                str(rendezvous),
                "--host",
                "127.0.0.1",
                "--index",
                str(i),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )  # fmt: skip
        for i in range(2)
    ]
    try:
        train = subprocess.run(
            [sys.executable, "-m", "megatron_rl.cli", "train", f"run.output_dir={tmp_path}", "run.name=sep",
             "run.steps=2", "rollout.placement=separate", "rollout.num_engines=2",
             f"rollout.engine_rendezvous={rendezvous}", "rollout.engine_wait_s=300", *QUICK],
            capture_output=True, text=True, timeout=900, env=env,
        )  # fmt: skip
        assert train.returncode == 0, train.stderr[-4000:]
        assert "2 rollout engine(s) started on separate nodes: 127.0.0.1:" in train.stderr
        result = json.loads(train.stdout.strip().splitlines()[-1])
        assert result["run_dir"] == str(tmp_path / "sep")
        records = [json.loads(line) for line in (tmp_path / "sep" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == [1, 2]
        for r in records:
            # Step 2 samples on both engines after the step-1 update was broadcast to them: exact weights.
            assert r["mismatch_max_abs_diff"] < 1e-5, r
            assert r["sync_mb"] > 0
        for server in servers:  # the trainer shut them down
            out, _ = server.communicate(timeout=120)
            assert server.returncode == 0, out[-3000:]
    finally:
        for server in servers:
            if server.poll() is None:
                server.kill()
                server.wait()
