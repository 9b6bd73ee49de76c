"""The sbatch scripts on a real two-node Slurm (munged, slurmctld, two slurmd started here), and their pieces.

The cluster is private to this module: its own munge key and socket, slurm.conf, ports, state and logs in a temp
dir; every daemon it starts is stopped by its pid. Its two nodes are two slurmd on this machine (`slurmd -N
NAME`, each with its own port, spool, pid and log file), named after this host and `localhost` so that both
names resolve (MASTER_ADDR and rollout.broadcast_host are node names). Each node has 2 CPUs and 2 GPUs that are
device nodes made here (mknod, no hardware): Slurm's own GPU binding sets CUDA_VISIBLE_DEVICES per task, and
torch still sees no GPU. The jobs run the tiny CPU config with two tasks (two ranks, data-parallel 2), as
`sbatch slurm/math_stage.sh` would on a GPU cluster, with vLLM on the second node (placement=separate), and a
two-stage recipe as a chain of jobs (`sbatch slurm/recipe.sh RECIPE`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from megatron_rl.distributed import first_slurm_host, slurm_rendezvous
from megatron_rl.train import preemption

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = sorted((REPO / "slurm").glob("*.sh"))
SBIN_PATH = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
SETTINGS = ("CONFIG", "MODEL_PATH", "DATA_PATH", "EVAL_DATA_PATH", "OUTPUT_DIR", "RUN_NAME", "LOG_DIR",
            "ROLLOUT_PLACEMENT", "ENGINE_NODES", "REPO_DIR", "SRUN_WAIT", "PYTHON")  # fmt: skip
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
    nodes: list[str] = field(default_factory=list)
    gpus_per_node: int = 0
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
        for last in (False, False, True):  # on a loaded machine scontrol has died of a SIGPIPE: ask again
            proc = self.run("scontrol", "show", "job", "-o", job_id, check=last)
            if proc.returncode == 0:
                break
            time.sleep(1)
        return dict(item.split("=", 1) for item in proc.stdout.split() if "=" in item)

    def wait_job(self, job_id: str, until, timeout: float) -> dict[str, str]:
        def check():
            job = self.job(job_id)
            if job.get("JobState") == "PENDING" and job.get("Reason") in NEVER_STARTS:
                raise AssertionError(f"job {job_id} can never start here: {job['Reason']}")
            return job if until(job) else None

        return _wait_for(check, timeout, f"job {job_id}", interval=1)  # scontrol takes CPU from the job

    def submit(
        self, script: str, out_dir: Path, overrides: list[str], nodes: int = 1, tasks_per_node: int = 2,
        gpus_per_node: int = 0, cpus_per_task: int = 1, python: str = sys.executable,
        settings: dict[str, str] | None = None,
    ) -> str:  # fmt: skip
        env = {k: v for k, v in self.env.items() if k not in SETTINGS}
        env |= {
            "CONFIG": "configs/tiny_math.yaml",
            "OUTPUT_DIR": str(out_dir),
            "PYTHON": python,
            **(settings or {}),
        }
        proc = subprocess.run(
            ["sbatch", "--parsable", f"--nodes={nodes}", f"--ntasks-per-node={tasks_per_node}",
             f"--gpus-per-node={gpus_per_node}", f"--cpus-per-task={cpus_per_task}",
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
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
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
{gres_types}
{node_lines}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
GPUS_PER_NODE = 2


def _fake_gpus(root: Path, nodes: list[str]) -> str:
    """gres.conf lines for GPUS_PER_NODE GPUs per node, backed by character devices made here (the numbers of
    /dev/null); "" where this machine refuses mknod (the cluster then has no GPUs)."""
    dev = root / "dev"
    dev.mkdir()
    lines = []
    for n, node in enumerate(nodes):
        first = n * GPUS_PER_NODE
        try:
            for i in range(first, first + GPUS_PER_NODE):
                os.mknod(dev / f"nvidia{i}", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        except OSError:
            return ""
        lines.append(f"NodeName={node} Name=gpu File={dev}/nvidia[{first}-{first + GPUS_PER_NODE - 1}]")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    _require("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "srun", "scancel", "squeue", "sinfo")
    if os.geteuid() != 0:
        pytest.fail(
            "the Slurm tests start slurmd, which runs jobs as their user: run them as root (as CI does)"
        )
    root = tmp_path_factory.mktemp("slurm")
    host = socket.gethostname().split(".")[0]
    if host == "localhost":
        pytest.fail("the two test nodes are named after this host and 'localhost': set a hostname")
    nodes = [host, "localhost"]  # both resolve to this machine
    for sub in ("munge", "state", "log", *(f"spool/{node}" for node in nodes)):
        (root / sub).mkdir(parents=True)
    os.chmod(root, 0o755)
    os.chmod(root / "munge", 0o755)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(128))
    key.chmod(0o400)
    gres = _fake_gpus(root, nodes)
    if gres:
        (root / "gres.conf").write_text(gres)
    gpus = GPUS_PER_NODE if gres else 0
    node_lines = "\n".join(
        f"NodeName={node} NodeHostname={host} NodeAddr={node} Port={_free_port()} CPUs=2"
        + (f" Gres=gpu:{gpus}" if gpus else "") + " State=UNKNOWN"
        for node in nodes
    )  # fmt: skip
    conf = root / "slurm.conf"
    conf.write_text(SLURM_CONF.format(host=host, root=root, ctld_port=_free_port(), node_lines=node_lines,
                                      gres_types="GresTypes=gpu" if gpus else ""))  # fmt: skip
    env = {**os.environ, "SLURM_CONF": str(conf), "PATH": SBIN_PATH}
    cluster = Cluster(root, env, nodes, gpus)
    try:
        m = root / "munge"
        cluster.start("munged", "munged", "--foreground", "--force", f"--socket={m}/munge.socket",
                      f"--key-file={key}", f"--pid-file={m}/munged.pid", f"--seed-file={m}/munged.seed",
                      f"--log-file={root}/log/munged.log")  # fmt: skip
        _wait_for(lambda: (m / "munge.socket").exists(), 10, "munged's socket", 0.1)
        cluster.start("slurmctld", "slurmctld", "-D", "-i")
        for node in nodes:
            cluster.start(f"slurmd-{node}", "slurmd", "-D", "-N", node)
        _wait_for(
            lambda: cluster.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.split() == ["idle"] * 2,
            30,
            "both nodes to be idle" + cluster.log_tail("slurm"),
        )
        yield cluster
    finally:
        cluster.stop()


def _log(out_dir: Path, job_id: str) -> str:
    """The job's batch output (OUT_DIR/<name>-<job id>.out), then its log (OUT_DIR/logs/<name>-<job id>.out)."""
    paths = [*out_dir.glob(f"*-{job_id}.out"), *(out_dir / "logs").glob(f"*-{job_id}.out")]
    return "".join(p.read_text(errors="replace") for p in paths)


def _metric_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return (
        sorted({json.loads(line)["step"] for line in path.read_text().splitlines()}) if path.is_file() else []
    )


def _until(ready, slurm: Cluster, job_id: str, timeout: float, what: str) -> bool:
    """Wait until `ready()` (called every 0.1 s) or until the job has finished (asked every 2 s: each scontrol
    takes this machine's CPUs from the job); return ready()."""
    asked = [0.0]

    def done() -> bool:
        if ready():
            return True
        if time.monotonic() - asked[0] >= 2:
            asked[0] = time.monotonic()
            return slurm.job(job_id)["JobState"] in FINISHED
        return False

    _wait_for(done, timeout, what, 0.1)
    return bool(ready())


def _preempt_as_soon_as_it_runs(slurm: Cluster, out_dir: Path, job_id: str) -> dict[str, str]:
    """Do what Slurm does at --signal=B:USR1@<seconds> before the time limit (signal the batch script only) once
    the batch script has its traps (it then writes the trainer's stop file, which the trainer reads after each
    step): the trainer, still starting, checkpoints and stops after its first step, far from its last one however
    loaded this machine is. Check the job requeued, and return it once it has finished."""

    def trapped() -> bool:  # the batch script's "job <id> ... restart 0:" line comes after its traps
        return any(
            " restart 0:" in log.read_text(errors="replace") for log in out_dir.glob(f"logs/*-{job_id}.out")
        )

    assert _until(trapped, slurm, job_id, 120, "the job to start"), (slurm.job(job_id), _log(out_dir, job_id))
    slurm.run("scancel", "--signal=USR1", "--batch", job_id)
    job = slurm.wait_job(job_id, lambda j: j["JobState"] in FINISHED or j.get("Restarts") != "0", timeout=400)
    assert job.get("Restarts") == "1", (job, _log(out_dir, job_id)[-4000:])
    return slurm.wait_job(
        job_id, lambda j: j["JobState"] in FINISHED, timeout=400
    )  # waits cred_expire, reruns


def test_recipe_chains_its_stages_and_requeues_mid_stage(slurm, tmp_path):
    """`sbatch slurm/recipe.sh RECIPE` for two short stages, one task each (two-rank jobs under Slurm: the NeMo-Run
    test below). A USR1 stops the first stage after its current step (the first) with a checkpoint there, the job
    requeues itself, resumes the stage from that checkpoint and finishes it: the last step is checkpointed though
    off the interval, and there is one result line. The job then submits the second stage's job (afterok), which
    starts from the first stage's final model without running the first stage again, and ends with the recipe's
    summary line."""
    steps = 2
    config = str(REPO / "configs" / "tiny_math.yaml")
    recipe = tmp_path / "chain.yaml"
    recipe.write_text(json.dumps({"name": "chain", "steps": [
        {"stage": "first", "config": config, "overrides": [f"run.steps={steps}", "run.checkpoint_every=3", *QUICK]},
        {"stage": "second", "config": config, "overrides": ["run.steps=1", *QUICK]},
    ]}))  # fmt: skip
    job_id = slurm.submit("slurm/recipe.sh", tmp_path, [str(recipe)], tasks_per_node=1, cpus_per_task=2)
    root = tmp_path / "chain"
    run_dir = root / "first"
    job = _preempt_as_soon_as_it_runs(slurm, tmp_path, job_id)
    log = _log(tmp_path, job_id)
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", log[-4000:]
    assert job["NumTasks"] == "1", job

    first, second = log.split("restart 1:")
    assert all("1 node(s)" in run and "1 task(s)" in run for run in (first, second)), log[-4000:]
    stopped = re.search(r"preempted: stopped after step (\d+)", first)
    assert stopped, log[-4000:]
    step = int(stopped.group(1))
    assert 1 <= step < steps
    assert "trainer exited with code 85" in first and f"requeueing job {job_id}" in first
    assert "submitted job" not in first  # a stage that stopped part-way chains nothing
    assert f"resumed from {run_dir}/checkpoints/step_{step:06d} at step {step}" in second
    assert "trainer exited with code 0" in second
    assert _metric_steps(run_dir) == list(range(1, steps + 1))
    ckpt = run_dir / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == f"step_{steps:06d}"
    last = ckpt / f"step_{steps:06d}"
    assert {p.name for p in last.glob("rank_*.pt")} == {"rank_0000.pt"}
    results = [json.loads(line.split(": ", 1)[1]) for line in log.splitlines() if re.match(r"0: \{", line)]
    assert len(results) == 1 and results[0]["run_dir"] == str(run_dir)
    assert "\n0: {" in second
    finished = (run_dir / "result.json").stat().st_mtime

    # The chained job: the second stage, from the first one's final model; the first is not run again.
    submitted = re.search(rf"submitted job (\d+) for step stage 'second' \(after job {job_id}\)", second)
    assert submitted, log[-4000:]
    next_id = submitted.group(1)
    slurm.jobs.append(next_id)
    next_job = slurm.wait_job(next_id, lambda j: j["JobState"] in FINISHED, timeout=400)
    next_log = _log(tmp_path, next_id)
    assert (next_job["JobState"], next_job["Restarts"], next_job["NumTasks"]) == ("COMPLETED", "0", "1"), (
        next_log
    )
    assert "stage 'second' (new)" in next_log and "run.name=chain/second" in next_log
    assert "run.name=chain/first" not in next_log and "resumed from" not in next_log
    assert (run_dir / "result.json").stat().st_mtime == finished
    assert _metric_steps(run_dir) == list(range(1, steps + 1))
    second_cfg = json.loads((root / "second" / "config.yaml").read_text())
    assert second_cfg["model"]["path"] == str(run_dir / "final_model")
    assert _metric_steps(root / "second") == [1]
    summary = json.loads(next_log.strip().splitlines()[-1])
    assert [s["name"] for s in summary["stages"]] == ["first", "second"]
    assert json.loads((root / "result.json").read_text()) == summary


def _job_hosts(slurm: Cluster, job: dict[str, str]) -> list[str]:
    return slurm.run("scontrol", "show", "hostnames", job["NodeList"]).stdout.split()


def test_math_stage_runs_engines_on_a_separate_node(slurm, tmp_path):
    """placement=separate on two nodes: two vLLM engine servers (one per GPU) on the job's last node, a one-rank
    trainer on the first, which splits each step's prompts over both engines and broadcasts its weights to both
    after every update (the trainer's log-probs then match the engines' exactly); the servers exit 0 when the
    trainer is done. (A requeue mid-stage is tested by the recipe chain above; a resumed trainer pushing its
    weights to fresh engine servers by tests/test_train_run.py's staleness-1 resume.)"""
    steps = 2
    engines = slurm.gpus_per_node or 1  # rollout TP 1: one engine per GPU (one per node without GPUs)
    overrides = ["run.name=separate", f"run.steps={steps}", "run.checkpoint_every=1", *QUICK]
    # Three processes on this machine's cores: one thread each, as on nodes of their own. SRUN_WAIT: servers left
    # without a trainer (a failed run) are cancelled after 60 s instead of 300.
    settings = {"ROLLOUT_PLACEMENT": "separate", "ENGINE_NODES": "1", "OMP_NUM_THREADS": "1",
                "SRUN_WAIT": "60"}  # fmt: skip
    job_id = slurm.submit("slurm/math_stage.sh", tmp_path, overrides, nodes=2, tasks_per_node=1,
                          gpus_per_node=slurm.gpus_per_node, cpus_per_task=2, settings=settings)  # fmt: skip
    run_dir = tmp_path / "separate"
    job = slurm.wait_job(job_id, lambda j: j["JobState"] in FINISHED, timeout=600)
    log = _log(tmp_path, job_id)
    assert job["JobState"] == "COMPLETED", log[-4000:]

    trainer, engine = _job_hosts(slurm, job)
    layout = f"{engines} serve-rollout task(s) on 1 node(s) [{engine}], {engines} per node"
    assert f"rollout engines: {layout}" in log, log[-4000:]
    assert f"trainer: 1 node(s) [{trainer}], 1 task(s)" in log
    assert f"\n0: trainer rank 0 on {trainer} " in log
    for i in range(engines):
        gpu = f"(CUDA_VISIBLE_DEVICES={i})" if slurm.gpus_per_node else ""
        assert f"\nengine {i}: engine server {i} on {engine} {gpu}" in log, log[-4000:]
    assert (
        f"rollout.num_engines={engines} rollout.engine_rendezvous={run_dir}/engines "
        f"rollout.broadcast_host={trainer}" in log
    )
    assert f"{engines} rollout engine(s) started on separate nodes: " in log, log[-4000:]
    # Exit code 0: the servers shut down on the trainer's request (one whose trainer vanished exits 1).
    assert "engine servers exited with code 0" in log and "trainer exited with code 0" in log, log[-4000:]
    assert _metric_steps(run_dir) == list(range(1, steps + 1))
    for record in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()):
        # Every step samples on the engines after the trainer's weights reached them (at the start and after each
        # update): the same weights, the same log-probs.
        assert record["mismatch_max_abs_diff"] < 1e-5 and record["sync_mb"] > 0, record


STUB_PYTHON = """#!/bin/bash
# Stands in for the trainer and the engine servers (python -m megatron_rl.cli ...): says where it runs and with
# what, and exits 0 (the trainer: $STUB_TRAINER_EXIT; a server with $STUB_ENGINE_HANGS set never ends).
# Anything else (the stage script's config check) runs in the real Python.
if [[ $1 == -m ]]; then
    echo "stub on $SLURMD_NODENAME task $SLURM_PROCID/$SLURM_NTASKS gpus=${{CUDA_VISIBLE_DEVICES:-}}" \\
        "cpus=${{SLURM_CPUS_PER_TASK:-}} master=${{MASTER_ADDR:-}}: ${{*:3}}"
    if [[ $3 == serve-rollout ]]; then
        [[ -z ${{STUB_ENGINE_HANGS:-}} ]] || exec sleep 600
        exit 0
    fi
    exit "${{STUB_TRAINER_EXIT:-0}}"
fi
exec {python} "$@"
"""


def _stub_python(tmp_path: Path) -> str:
    stub = tmp_path / "python"
    stub.write_text(STUB_PYTHON.format(python=sys.executable))
    stub.chmod(0o755)
    return str(stub)


@pytest.mark.parametrize("tp", [1, 2])
def test_separate_placement_gives_each_engine_its_gpus(slurm, tmp_path, tp):
    """The layout the stage script asks Slurm for, with a stub in place of the trainer and the servers: two
    nodes x 2 GPUs x 2 tasks, rollout TP 1 (two engines, one GPU each) or 2 (one engine with both GPUs)."""
    if not slurm.gpus_per_node:
        pytest.skip("this machine refused mknod: the test cluster has no GPUs to bind")
    rendezvous = tmp_path / "layout" / "engines"
    rendezvous.mkdir(parents=True)
    (rendezvous / "engine_7.json").write_text("{}")  # left by an earlier run of the same job id
    overrides = ["run.name=layout", "rollout.placement=separate", "rollout.engine_nodes=1",
                 f"rollout.tensor_parallel_size={tp}"]  # fmt: skip
    job_id = slurm.submit("slurm/math_stage.sh", tmp_path, overrides, nodes=2, tasks_per_node=2,
                          gpus_per_node=slurm.gpus_per_node, python=_stub_python(tmp_path))  # fmt: skip
    job = slurm.wait_job(job_id, lambda j: j.get("JobState") in FINISHED, timeout=120)
    log = _log(tmp_path, job_id)
    assert job["JobState"] == "COMPLETED", log[-4000:]
    trainer, engine = _job_hosts(slurm, job)
    engines = 2 // tp
    stubs = sorted(re.findall(r"^(engine \d|\d): stub on (\S+) task (\d)/(\d) gpus=(\S*) cpus=(\d*) master=\S*: (\S+)",
                              log, re.MULTILINE))  # fmt: skip
    engine_gpus = [",".join(map(str, range(i * tp, (i + 1) * tp))) for i in range(engines)]
    assert stubs == [
        *[(f"{rank}", trainer, f"{rank}", "2", "0,1", "1", "train") for rank in range(2)],
        *[(f"engine {i}", engine, f"{i}", f"{engines}", engine_gpus[i], f"{tp}", "serve-rollout") for i in range(engines)],
    ], log[-4000:]  # fmt: skip
    assert f"master={trainer}: train " in log
    assert f"serve-rollout --rendezvous {rendezvous}\n" in log
    assert (
        f"rollout.num_engines={engines} rollout.engine_rendezvous={rendezvous} rollout.broadcast_host={trainer}\n"
        in log
    )
    assert not list(rendezvous.glob("engine_*.json"))
    assert "trainer exited with code 0" in log and "engine servers exited with code 0" in log


def test_engine_servers_outliving_the_trainer_are_cancelled(slurm, tmp_path):
    """Servers that never heard from a trainer (it failed first) would wait forever: the script gives them
    SRUN_WAIT seconds, cancels their step, and the job ends with the trainer's exit code."""
    settings = {"SRUN_WAIT": "2", "STUB_ENGINE_HANGS": "1", "STUB_TRAINER_EXIT": "3"}
    job_id = slurm.submit("slurm/math_stage.sh", tmp_path, ["rollout.placement=separate", "rollout.engine_nodes=1"],
                          nodes=2, tasks_per_node=1, python=_stub_python(tmp_path), settings=settings)  # fmt: skip
    job = slurm.wait_job(job_id, lambda j: j.get("JobState") in FINISHED, timeout=120)
    log = _log(tmp_path, job_id)
    assert (job["JobState"], job["ExitCode"]) == ("FAILED", "3:0"), log[-4000:]
    assert "trainer exited with code 3" in log
    assert re.search(
        rf"engine servers still running 2 s after the trainer: cancelling step {job_id}\.\d+\n", log
    )
    exited = re.search(r"engine servers exited with code (\d+)", log)
    assert exited and exited.group(1) != "0", log[-4000:]


def _trainer_processes(run_name: str) -> list[psutil.Process]:
    """The `megatron_rl.cli train` processes of one run (found by its run.name override)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        is_python = bool(cmd) and os.path.basename(cmd[0]).startswith(
            "python"
        )  # not the srun that started it
        if is_python and "megatron_rl.cli" in cmd and "train" in cmd and f"run.name={run_name}" in cmd:
            found.append(proc)
    return found


def test_nemo_run_slurm_executor_submits_and_requeues_after_a_crash(slurm, tmp_path):
    """`python -m launchers.math_stage --executor slurm` submits NeMo-Run's own sbatch script (git archive of the
    repo, srun of one task per GPU) to the real cluster. A trainer rank killed after the first checkpoint fails the
    step; with --retries 1 NeMo-Run's script requeues the job, whose command carries --resume: it continues from
    the checkpoint and finishes. (NeMo-Run reads job states with sacct, which needs slurmdbd: --detach, and the
    test watches the job with scontrol.)"""
    if not slurm.gpus_per_node:
        pytest.skip(
            "this machine refused mknod: the test cluster has no GPUs for the executor's --gpus-per-node"
        )
    steps, name = 4, "nemo_slurm"
    runs, jobs = tmp_path / "runs", tmp_path / "jobs"
    env = {k: v for k, v in slurm.env.items() if not k.startswith("MEGATRON_RL_")}
    env["NEMORUN_HOME"] = str(tmp_path / "nemo_run_home")
    launch = subprocess.run(
        [sys.executable, "-m", "launchers.math_stage", "--executor", "slurm", "--config", "configs/tiny_math.yaml",
         "--account", "test", "--nodes", "1", "--gpus-per-node", str(slurm.gpus_per_node), "--time", "00:30:00",
         "--job-dir", str(jobs), "--output-dir", str(runs), "--python", sys.executable, "--retries", "1",
         "--detach", f"run.name={name}", f"run.steps={steps}", "run.checkpoint_every=1", *QUICK,
         "rollout.engine_ranks=all"],  # an engine inside each rank: no engine process of its own to spawn
        cwd=REPO, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert launch.returncode == 0, launch.stdout[-3000:] + launch.stderr[-3000:]
    result = json.loads(launch.stdout.strip().splitlines()[-1])
    job_id = result["slurm_job_id"]
    slurm.jobs.append(job_id)
    run_dir = runs / name
    assert result["run_dir"] == str(run_dir)

    def nemo_logs() -> str:
        return "".join(
            f"\n--- {p.name}\n" + p.read_text(errors="replace")[-3000:] for p in sorted(jobs.rglob("*.out"))
        )

    latest = run_dir / "checkpoints" / "latest"
    assert _until(latest.is_file, slurm, job_id, 400, "a first checkpoint"), (slurm.job(job_id), nemo_logs())
    trainers = _wait_for(lambda: _trainer_processes(name), 30, "the trainer processes")
    assert len(trainers) == slurm.gpus_per_node  # one task per GPU
    assert all("--resume" in p.cmdline() for p in trainers)
    trainers[-1].kill()  # a rank dies (SIGKILL to its pid only): srun ends the step with an error

    job = slurm.wait_job(job_id, lambda j: j["JobState"] in FINISHED, timeout=500)
    logs = nemo_logs()
    assert (job["JobState"], job["Restarts"]) == ("COMPLETED", "1"), (job, logs)
    assert re.search(rf"resumed from {run_dir}/checkpoints/step_\d{{6}} at step [1-9]", logs), logs
    assert _metric_steps(run_dir) == list(range(1, steps + 1))
    assert latest.read_text().strip() == f"step_{steps:06d}"
    assert json.loads((run_dir / "result.json").read_text())["run_dir"] == str(run_dir)


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


def test_separate_placement_is_checked_before_srun(tmp_path):
    one_node = _stage(tmp_path, "rollout.engine_nodes=1", CONFIG="configs/tiny_math.yaml", SLURM_JOB_NUM_NODES="1",
                      ROLLOUT_PLACEMENT="separate")  # fmt: skip
    assert one_node.returncode == 2 and one_node.stderr.strip().splitlines() == [
        "error: rollout.engine_nodes=1 leaves no node to train on: this job has 1 node(s) (sbatch --nodes=2 or more)"
    ]
    no_engines = _stage(tmp_path, "rollout.placement=separate", CONFIG="configs/tiny_math.yaml",
                        SLURM_JOB_NUM_NODES="2")  # fmt: skip
    assert no_engines.returncode == 2 and no_engines.stderr.strip().splitlines() == [
        "error: rollout.engine_nodes is 0 with rollout.placement=separate: set it (or ENGINE_NODES) to the number "
        "of nodes for vLLM, 1 to nodes - 1"
    ]
    odd_tp = _stage(tmp_path, "rollout.placement=separate", "rollout.tensor_parallel_size=3",
                    CONFIG="configs/tiny_math.yaml", ENGINE_NODES="1", SLURM_JOB_NUM_NODES="2",
                    SLURM_GPUS_ON_NODE="8")  # fmt: skip
    assert odd_tp.returncode == 2 and odd_tp.stderr.strip().splitlines() == [
        "error: rollout.tensor_parallel_size=3 does not divide the 8 GPU(s) per node: no whole number of engines "
        "per engine node"
    ]
    all_ranks = _stage(tmp_path, "rollout.placement=separate", "rollout.engine_ranks=all", ENGINE_NODES="1",
                       CONFIG="configs/tiny_math.yaml", SLURM_JOB_NUM_NODES="2")  # fmt: skip
    assert all_ranks.returncode == 2 and all_ranks.stderr.strip().splitlines() == [
        "error: rollout.engine_ranks=all puts the engines on the trainer's ranks, rollout.placement=separate on "
        "their own nodes: add rollout.engine_ranks=driver"
    ]


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
