"""A tiny code-stage training run end to end as an ordinary user: real vLLM, real megatron-core, the real code
reward (bubblewrap sandbox, reward pool).

Cluster jobs run as an ordinary user. Here the test (root, as in CI) runs `megatron-rl train` on
configs/tiny_code.yaml AS the user `mrlsbx` (tests/test_sandbox_nonroot.py's user), with a HOME, caches, TMPDIR
and output dir of its own. The data is one formula of the tiny code task (TinyCodeTask.train_problem(0)): after
40 SFT steps on its reference program the model writes programs that pass, so the rewards of 1 in the 2 RL steps
are programs that ran and passed in the sandbox. The run must finish, the reward pool must have chosen a
non-root mechanism (userns-nproc or uid-task-cap), and everything it wrote must belong to the user, with no
process of the user left.

The venv's interpreter may live under a directory the user cannot search (pyenv under /root, mode 0700): the
run starts as root in a private mount namespace where each such directory is covered by a mode-0755 tmpfs that
holds only binds of what the run needs (the interpreter, the venv, the checkout), then drops to the user with
setpriv. Nothing on the host changes.
"""

from __future__ import annotations

import json
import os
import pwd
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from megatron_rl.rewards.confinement import MECHANISMS, UID_TASK_CAP, USERNS_NPROC
from megatron_rl.rewards.sandbox import find_bwrap, is_root, processes_of_uid
from tests.test_sandbox_nonroot import user  # noqa: F401  (the fixture: creates or reuses mrlsbx)
from tests.test_train_run import kill_run

REPO = Path(__file__).resolve().parents[1]
SFT_STEPS = 40
RL_STEPS = 2


def _can_unshare_mounts() -> bool:
    if not is_root() or shutil.which("unshare") is None:
        return False
    probe = ["unshare", "--mount", "--propagation", "private", "true"]
    return subprocess.run(probe, capture_output=True).returncode == 0


pytestmark = [
    pytest.mark.skipif(
        not is_root(), reason="creates the user mrlsbx and switches to it: needs root (CI is root)"
    ),
    pytest.mark.skipif(find_bwrap() is None, reason="bubblewrap is not installed (make system-deps)"),
    pytest.mark.skipif(shutil.which("useradd") is None, reason="useradd is missing"),
    pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is missing"),
    pytest.mark.skipif(not _can_unshare_mounts(), reason="cannot create a private mount namespace here"),
]


def unsearchable_dirs(paths: list[Path]) -> dict[Path, set[str]]:
    """Each ancestor of `paths` that other users cannot search, with the names under it the paths go through,
    outermost first."""
    hidden: dict[Path, set[str]] = {}
    for path in paths:
        for parent in path.parents:
            if not os.stat(parent).st_mode & stat.S_IXOTH:
                hidden.setdefault(parent, set()).add(path.relative_to(parent).parts[0])
    return dict(sorted(hidden.items(), key=lambda item: len(item[0].parts)))


def uncover_script(hidden: dict[Path, set[str]], stash: Path) -> str:
    """Shell lines (run as root in a private mount namespace) that put a mode-0755 tmpfs over each hidden
    directory, holding binds of only the names the run needs from it."""
    lines = []
    for i, (directory, names) in enumerate(hidden.items()):
        keep = stash / str(i)
        lines += [f"mkdir {keep}", f"mount --bind {shlex.quote(str(directory))} {keep}"]
        lines.append(f"mount -t tmpfs -o mode=0755 tmpfs {shlex.quote(str(directory))}")
        for name in sorted(names):
            inside = shlex.quote(str(directory / name))
            make = f"mkdir {inside}" if (directory / name).is_dir() else f"touch {inside}"
            lines += [make, f"mount --bind {shlex.quote(str(keep / name))} {inside}"]
    return "\n".join(lines)


def write_data(data: Path) -> None:
    """One formula of the tiny code task: its problem (4 rows) and its reference program as the SFT pair."""
    from megatron_rl.data.synthetic import problem_row
    from megatron_rl.data.tiny_code import TinyCodeTask

    task = TinyCodeTask(seed=0, eval_size=1)
    problem = task.train_problem(0)
    (data / "code.jsonl").write_text(problem_row(problem) * 4)
    pair = {"prompt": problem.prompt, "response": task.sft_response(problem)}
    (data / "sft.jsonl").write_text(json.dumps(pair) + "\n")


def chown_tree(root: Path, uid: int, gid: int) -> None:
    for path in [root, *root.rglob("*")]:
        os.chown(path, uid, gid, follow_symlinks=False)


def processes_of_run(uid: int, home: Path) -> list[int]:
    """The user's processes that carry the run's HOME (the trainer, its engine and reward workers, their
    sandboxes' bwrap): other processes of the user (another test's) are not the run's."""
    marker = f"HOME={home}".encode()
    pids = []
    for pid in processes_of_uid(uid):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if marker in f.read().split(b"\0"):
                    pids.append(pid)
        except OSError:
            continue
    return pids


def test_tiny_code_training_as_an_ordinary_user(user) -> None:  # noqa: F811
    base = Path(tempfile.mkdtemp(prefix="mrl-nonroot-"))  # root's: holds the stash and the user's HOME
    try:
        _run_as_user(user, base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _run_as_user(account: pwd.struct_passwd, base: Path) -> None:
    os.chmod(base, 0o711)  # the user may pass through to its HOME, not list or write
    stash = base / "stash"
    stash.mkdir(mode=0o700)
    home = base / "home"
    for sub in ("data", "runs", "tmp", ".cache"):
        (home / sub).mkdir(parents=True)
    write_data(home / "data")
    # torch.compile's cache of the caller's earlier runs (vLLM's CPU sampler compiles a few functions): compiling
    # them again for an empty cache would cost ~25 s of CI time and is not what this test is about
    compiled = Path(tempfile.gettempdir()) / f"torchinductor_{pwd.getpwuid(os.getuid()).pw_name}"
    if compiled.is_dir():
        shutil.copytree(compiled, home / ".cache" / "torchinductor", symlinks=True)
    chown_tree(home, account.pw_uid, account.pw_gid)

    python = Path(sys.executable)  # the venv's: its pyvenv.cfg finds the base interpreter
    needed = [Path(sys.base_prefix).resolve(), Path(sys.prefix), python.resolve(), REPO]
    hidden = unsearchable_dirs(needed)
    cache = home / ".cache"
    env = {
        "PATH": f"{python.parent}:/usr/bin:/bin",
        "HOME": str(home),
        "USER": account.pw_name,
        "LOGNAME": account.pw_name,
        "LANG": "C.UTF-8",
        "TMPDIR": str(home / "tmp"),
        "PYTHONPATH": str(REPO),
        "PYTHONDONTWRITEBYTECODE": "1",  # the checkout is root's
        "XDG_CACHE_HOME": str(cache),
        "HF_HOME": str(cache / "huggingface"),
        "TRITON_CACHE_DIR": str(cache / "triton"),
        "TORCHINDUCTOR_CACHE_DIR": str(cache / "torchinductor"),
        "VLLM_CACHE_ROOT": str(cache / "vllm"),
        "VLLM_CONFIG_ROOT": str(home / ".config" / "vllm"),
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
    }
    overrides = [
        f"run.output_dir={home / 'runs'}", "run.name=code", f"run.steps={RL_STEPS}",
        f"run.checkpoint_every={RL_STEPS}", "run.reward_workers=1",
        "data.source=file", f"data.train_path={home / 'data' / 'code.jsonl'}",
        f"sft.train_path={home / 'data' / 'sft.jsonl'}", f"sft.max_steps={SFT_STEPS}", "sft.batch_size=8",
        f"sft.eval_after={SFT_STEPS}", f"sft.eval_every={SFT_STEPS}", "sft.stop_at_accuracy=0",
        "rollout.prompts_per_step=2", "rollout.group_size=4", "rollout.temperature=0.6",
        "eval.samples_per_problem=1",
    ]  # fmt: skip
    train = [
        str(python),
        "-m",
        "megatron_rl.cli",
        "train",
        "--config",
        str(REPO / "configs" / "tiny_code.yaml"),
    ]
    drop = ["setpriv", f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}", "--init-groups", "--"]
    script = "\n".join(
        [
            "set -eu",
            uncover_script(hidden, stash),
            f"cd {shlex.quote(str(home))}",
            "exec " + shlex.join([*drop, *train, *overrides]),
        ]
    )
    with open(base / "train.out", "w") as out, open(base / "train.err", "w") as err:
        proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
            stdout=out,
            stderr=err,
            env=env,
            cwd="/",
            start_new_session=True,
        )
    try:
        returncode = proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            kill_run(proc.pid)  # the sessions of the run this test started
            proc.wait()
    stderr = (base / "train.err").read_text()
    assert returncode == 0, stderr[-4000:]

    run_dir = home / "runs" / "code"
    result = json.loads((base / "train.out").read_text().strip().splitlines()[-1])
    assert result["run_dir"] == str(run_dir)
    # The sandbox ran the programs as the user: the reward pool logged a non-root mechanism ("code sandbox:
    # process cap by userns-nproc (...)") ...
    logged = [line for line in stderr.splitlines() if " megatron_rl.rewards." in line]
    named = {m for line in logged for m in MECHANISMS if m in line}
    assert named and named <= {USERNS_NPROC, UID_TASK_CAP}, logged or stderr[-4000:]
    # ... and programs passed there: the SFT evaluation, the RL steps and the final evaluation all scored some 1s.
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, RL_STEPS + 1))
    assert result["sft_accuracy"] > 0 and result["rl_accuracy"] > 0, result
    assert any(r["reward_mean"] > 0 for r in records), [r["reward_mean"] for r in records]

    # Everything the run wrote is the user's: run dir, checkpoint, final model, caches, temp files.
    assert (run_dir / "checkpoints" / f"step_{RL_STEPS:06d}").is_dir()
    assert (run_dir / "final_model" / "model.safetensors").is_file()
    written = [home, *home.rglob("*")]
    not_theirs = [str(p) for p in written if p.lstat().st_uid != account.pw_uid]
    assert not not_theirs, not_theirs[:10]
    # Nothing of the run is left running.
    deadline = time.monotonic() + 10
    while processes_of_run(account.pw_uid, home) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_of_run(account.pw_uid, home) == []
