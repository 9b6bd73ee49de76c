"""The sbatch scripts on a real one-node Slurm (munged, slurmctld, slurmd started here), and their pieces.

The cluster is private to this module: its own munge key and socket, slurm.conf, ports, state and logs in a temp
dir; every daemon it starts is stopped by its pid. The jobs run the tiny CPU config with two tasks (two ranks,
data-parallel 2), as `sbatch slurm/math_stage.sh` would on a GPU cluster.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from megatron_rl.distributed import first_slurm_host, slurm_rendezvous
from megatron_rl.train import preemption

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = sorted((REPO / "slurm").glob("*.sh"))
SBIN_PATH = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
SETTINGS = ("CONFIG", "MODEL_PATH", "DATA_PATH", "EVAL_DATA_PATH", "OUTPUT_DIR", "RUN_NAME", "LOG_DIR",
            "ROLLOUT_PLACEMENT", "REPO_DIR", "SRUN_WAIT")  # fmt: skip
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED"}
NEVER_STARTS = {"PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit", "BadConstraints"}
INSTALL_HINT = "run `make system-deps` as root (installs slurmctld slurmd slurm-client munge shellcheck)"

# The quick tiny run (no SFT, 1-digit problems, a few short samples), as in test_train_run.py but smaller.
QUICK = [
    "run.reward_workers=1", "run.tensorboard=false", "sft.enabled=false", "data.synthetic_digits=1",
    "data.synthetic_eval_size=8", "rollout.prompts_per_step=4", "rollout.group_size=2",
    "rollout.max_response_tokens=16", "eval.samples_per_problem=1",
]  # fmt: skip


def _require(*commands: str) -> None:
    missing = [c for c in commands if shutil.which(c, path=SBIN_PATH) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not found: {INSTALL_HINT}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@dataclass
class Cluster:
    root: Path
    env: dict[str, str]
    daemons: list[tuple[str, subprocess.Popen]] = field(default_factory=list)
    jobs: list[str] = field(default_factory=list)

    def run(self, *args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=60, **kw)
        if check and proc.returncode:
            raise AssertionError(f"{' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def start(self, name: str, *args: str) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "w")  # noqa: SIM115 - closed with the daemon
        proc = subprocess.Popen(
            args, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        self.daemons.append((name, proc))
        time.sleep(0.2)
        if proc.poll() is not None:
            raise AssertionError(f"{name} exited {proc.returncode} at start: {self.log_tail(name)}")

    def log_tail(self, name: str, lines: int = 20) -> str:
        text = ""
        for path in (self.root / "log").glob(f"{name}*"):
            text += f"\n--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        return text

    def stop(self) -> None:
        """Cancel what is left of our jobs, then stop each daemon we started, by its pid, newest first."""
        if self.jobs and any(proc.poll() is None for name, proc in self.daemons if name == "slurmctld"):
            self.run("scancel", *self.jobs, check=False)
            try:
                _wait_for(
                    lambda: not self.run("squeue", "-h", "-o", "%i", check=False).stdout.strip(), 30, "jobs"
                )
            except AssertionError:
                pass
        for _, proc in reversed(self.daemons):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def job(self, job_id: str) -> dict[str, str]:
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def wait_job(self, job_id: str, until, timeout: float) -> dict[str, str]:
        def check():
            job = self.job(job_id)
            if job.get("JobState") == "PENDING" and job.get("Reason") in NEVER_STARTS:
                raise AssertionError(f"job {job_id} can never start here: {job['Reason']}")
            return job if until(job) else None

        return _wait_for(check, timeout, f"job {job_id}")

    def submit(self, script: str, out_dir: Path, overrides: list[str]) -> str:
        env = {k: v for k, v in self.env.items() if k not in SETTINGS}
        env |= {"CONFIG": "configs/tiny_math.yaml", "OUTPUT_DIR": str(out_dir), "PYTHON": sys.executable}
        proc = subprocess.run(
            ["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1",
             f"--output={out_dir}/sbatch-%j.out", script, *overrides],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        job_id = proc.stdout.strip().split(";")[0]
        self.jobs.append(job_id)
        return job_id


SLURM_CONF = """\
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s);
# sched_interval/bf_interval: schedule pending jobs every second or two instead of every 30-60 s.
ClusterName=mrltest
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={root}/munge/munge.socket,cred_expire=10
CredType=cred/munge
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
MinJobAge=3600
KillWait=10
ReturnToService=2
SchedulerParameters=sched_interval=2,bf_interval=1
NodeName={host} CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    _require("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "srun", "scancel", "squeue", "sinfo")
    if os.geteuid() != 0:
        pytest.fail(
            "the Slurm tests start slurmd, which runs jobs as their user: run them as root (as CI does)"
        )
    root = tmp_path_factory.mktemp("slurm")
    for sub in ("munge", "state", "spool", "log"):
        (root / sub).mkdir()
    os.chmod(root, 0o755)
    os.chmod(root / "munge", 0o755)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(128))
    key.chmod(0o400)
    host = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text(SLURM_CONF.format(host=host, root=root, ctld_port=_free_port(), slurmd_port=_free_port()))
    env = {**os.environ, "SLURM_CONF": str(conf), "PATH": SBIN_PATH}
    cluster = Cluster(root, env)
    try:
        m = root / "munge"
        cluster.start("munged", "munged", "--foreground", "--force", f"--socket={m}/munge.socket",
                      f"--key-file={key}", f"--pid-file={m}/munged.pid", f"--seed-file={m}/munged.seed",
                      f"--log-file={root}/log/munged.log")  # fmt: skip
        _wait_for(lambda: (m / "munge.socket").exists(), 10, "munged's socket", 0.1)
        cluster.start("slurmctld", "slurmctld", "-D", "-i")
        cluster.start("slurmd", "slurmd", "-D")
        _wait_for(
            lambda: cluster.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip() == "idle",
            30,
            "the node to be idle" + cluster.log_tail("slurm"),
        )
        yield cluster
    finally:
        cluster.stop()


def _log(out_dir: Path, job_id: str) -> str:
    logs = list((out_dir / "logs").glob(f"*-{job_id}.out"))
    sbatch_out = out_dir / f"sbatch-{job_id}.out"
    text = sbatch_out.read_text(errors="replace") if sbatch_out.is_file() else ""
    return text + "".join(p.read_text(errors="replace") for p in logs)


def _metric_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return (
        sorted({json.loads(line)["step"] for line in path.read_text().splitlines()}) if path.is_file() else []
    )


def test_math_stage_runs_two_ranks_to_completion(slurm, tmp_path):
    job_id = slurm.submit(
        "slurm/math_stage.sh", tmp_path, ["run.name=done", "run.steps=3", "run.checkpoint_every=2", *QUICK]
    )
    job = slurm.wait_job(job_id, lambda j: j.get("JobState") in FINISHED, timeout=400)
    log = _log(tmp_path, job_id)
    assert job["JobState"] == "COMPLETED", log[-4000:]
    assert "2 task(s)" in log and "trainer exited with code 0" in log
    run_dir = tmp_path / "done"
    assert _metric_steps(run_dir) == [1, 2, 3]
    ckpt = run_dir / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_000003"
    assert {p.name for p in (ckpt / "step_000003").glob("rank_*.pt")} == {"rank_0000.pt", "rank_0001.pt"}
    results = [json.loads(line.split(": ", 1)[1]) for line in log.splitlines() if re.match(r"[01]: \{", line)]
    assert len(results) == 1 and results[0]["run_dir"] == str(run_dir)  # one result line, from rank 0


def test_math_stage_requeues_on_usr1_and_resumes(slurm, tmp_path):
    steps = 8
    overrides = ["run.name=preempted", f"run.steps={steps}", "run.checkpoint_every=1", *QUICK]
    job_id = slurm.submit("slurm/math_stage.sh", tmp_path, overrides)
    run_dir = tmp_path / "preempted"
    latest = run_dir / "checkpoints" / "latest"
    _wait_for(
        lambda: latest.is_file() or slurm.job(job_id)["JobState"] in FINISHED, 400, "a first checkpoint", 0.1
    )
    assert latest.is_file(), _log(tmp_path, job_id)[-4000:]
    # What Slurm does at --signal=B:USR1@<seconds> before the time limit: signal the batch script only.
    slurm.run("scancel", "--signal=USR1", "--batch", job_id)
    job = slurm.wait_job(job_id, lambda j: j["JobState"] in FINISHED or j.get("Restarts") != "0", timeout=120)
    assert job.get("Restarts") == "1", (job, _log(tmp_path, job_id)[-4000:])
    job = slurm.wait_job(
        job_id, lambda j: j["JobState"] in FINISHED, timeout=400
    )  # waits cred_expire, reruns
    log = _log(tmp_path, job_id)
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", log[-4000:]

    stopped = re.search(r"preempted: stopped after step (\d+)", log)
    assert stopped, log[-4000:]
    step = int(stopped.group(1))
    assert 1 <= step < steps
    assert "trainer exited with code 85" in log and f"requeueing job {job_id}" in log
    assert f"resumed from {run_dir}/checkpoints/step_{step:06d} at step {step}" in log
    assert "restart 1:" in log and "trainer exited with code 0" in log
    assert _metric_steps(run_dir) == list(range(1, steps + 1))
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{steps:06d}"


# ---- the pieces, without a cluster


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_script_parses(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_scripts_pass_shellcheck():
    _require("shellcheck")
    proc = subprocess.run(["shellcheck", "-x", *[str(p.relative_to(REPO)) for p in SCRIPTS]], cwd=REPO,
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stdout


def _stage(tmp_path, *overrides: str, **env: str) -> subprocess.CompletedProcess:
    """Run a stage script as if inside a job (SLURM_JOB_ID set), for the checks it makes before srun."""
    base = {k: v for k, v in os.environ.items() if k not in SETTINGS and not k.startswith("SLURM_")}
    base |= {"SLURM_JOB_ID": "7", "OUTPUT_DIR": str(tmp_path), "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(REPO / "slurm" / "math_stage.sh"), *overrides], env=base, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_stage_script_names_what_is_missing(tmp_path):
    outside = _stage(tmp_path, SLURM_JOB_ID="")
    assert outside.returncode == 2 and "not inside a Slurm job" in outside.stderr
    no_model_7b = _stage(tmp_path)  # math_stage.sh's default config is sized for a 7B model it must be given
    assert no_model_7b.returncode == 2, no_model_7b.stderr
    assert no_model_7b.stderr.strip().splitlines() == [
        "error: MODEL_PATH is required: configs/math_stage_7b.yaml is sized for qwen2-7b and sets no model.path"
    ]
    no_config = _stage(tmp_path, CONFIG="configs/nope.yaml")
    assert no_config.returncode == 2 and "CONFIG=configs/nope.yaml does not exist" in no_config.stderr
    no_data = _stage(tmp_path, "data.source=file", CONFIG="configs/tiny_math.yaml")
    assert no_data.returncode == 2, no_data.stderr
    assert no_data.stderr.strip().splitlines() == [
        "error: DATA_PATH is required: configs/tiny_math.yaml reads prompts from a file and sets no data.train_path"
    ]
    bad_key = _stage(tmp_path, "run.nope=1", CONFIG="configs/tiny_math.yaml")
    assert bad_key.returncode == 2 and "unknown config key 'run.nope'" in bad_key.stderr
    no_model = _stage(tmp_path, CONFIG="configs/tiny_math.yaml", MODEL_PATH=str(tmp_path / "absent"))
    assert (
        no_model.returncode == 2 and f"MODEL_PATH={tmp_path / 'absent'} is not a directory" in no_model.stderr
    )


def test_rendezvous_from_slurm_variables():
    assert first_slurm_host("vm") == "vm"
    assert first_slurm_host("gpu[07-09,12],cpu1") == "gpu07"
    assert first_slurm_host("rack1-n[3-4]-ib,x") == "rack1-n3-ib"
    step = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
            "SLURM_JOB_NODELIST": "node[04-05]", "SLURM_JOB_ID": "123456"}  # fmt: skip
    assert slurm_rendezvous(step) == {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                                      "MASTER_ADDR": "node04", "MASTER_PORT": "23456"}  # fmt: skip
    batch_shell = {k: v for k, v in step.items() if k != "SLURM_STEP_ID"}  # no srun: not a rank of anything
    assert slurm_rendezvous(batch_shell) == {}


def test_stop_is_requested_by_signal_or_stop_file(tmp_path, monkeypatch):
    stop_file = tmp_path / "stop"
    monkeypatch.setenv(preemption.STOP_FILE_ENV, str(stop_file))
    saved = {sig: signal.getsignal(sig) for sig in preemption.SIGNALS}
    try:
        preemption.install()
        assert not preemption.stop_requested()
        stop_file.touch()
        assert preemption.stop_requested()
        stop_file.unlink()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert preemption.stop_requested()
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
