"""The adversarial suite as an ordinary user who holds a process of 200+ threads, with real bubblewrap.

As a non-root user, RLIMIT_NPROC counts every task of the caller's uid, so a busy trainer used to leave no room
for the sandbox. Here the test (root, as in CI) creates the user `mrlsbx` and a process of that user with 200
sleeping threads, then runs a reward pool AS that user (the system python, a copy of the rewards package) and
scores every program of tests/test_rewards_adversarial.py: each must score 0, the pool must lose no worker and
still score a good program 1, and nothing may be left behind or changed on the host. It runs once with the
mechanism the pool picks on this node and once forced onto the fallback (launch cap + the driver's supervisor).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from megatron_rl.rewards.confinement import UID_TASK_CAP, USERNS_NPROC
from megatron_rl.rewards.sandbox import find_bwrap, is_root, processes_of_uid
from tests.test_rewards_adversarial import (
    HOST_TMP_FILE,
    REPO,
    REWARDS_SRC,
    SECRET,
    LoopbackServers,
    M,
    _tree_digest,
    attacks,
)

USER = "mrlsbx"
SYSTEM_PYTHON = "/usr/bin/python3"
BUSY_THREADS = 200

pytestmark = [
    pytest.mark.skipif(
        not is_root(), reason="creates the user mrlsbx and switches to it: needs root (CI is root)"
    ),
    pytest.mark.skipif(find_bwrap() is None, reason="bubblewrap is not installed (make system-deps)"),
    pytest.mark.skipif(shutil.which("useradd") is None, reason="useradd is missing"),
]

BUSY = f"""
import threading, time
stop = threading.Event()
for _ in range({BUSY_THREADS}):
    threading.Thread(target=stop.wait, daemon=True).start()
print("ready", flush=True)
time.sleep(3600)
"""

# Runs as the user. Line protocol on stdin/stdout: -> {"root_dir", "other_worker"}; <- {"programs", "force"};
# -> {"results", "restarts", "good", "mechanism", "uid_tasks", "elapsed"}.
SCORER = """
import json, os, sys, time
from megatron_rl.rewards import RewardPool, parse_tests
from megatron_rl.rewards.confinement import ProcessCap, count_uid_tasks

with RewardPool(workers=2, code_timeout=2.0) as pool:
    print(json.dumps({"root_dir": pool.root_dir, "other_worker": pool._workers[1].proc.pid}), flush=True)
    job = json.loads(sys.stdin.readline())
    if job["force"]:
        pool.process_cap = ProcessCap(job["force"], "forced by the test")
    names = list(job["programs"])
    tests = parse_tests([{"input": "", "output": job["marker"], "testtype": "stdin"}])
    uid_tasks = count_uid_tasks(os.getuid())
    start = time.monotonic()
    results = pool.run_programs([job["programs"][n] for n in names], [tests] * len(names))
    elapsed = time.monotonic() - start
    good = parse_tests([{"input": "2 3", "output": "5", "testtype": "stdin"}])
    good_reward = pool.run_programs(["print(sum(map(int, input().split())))"], [good])[0].reward
    print(json.dumps({
        "results": {n: [r.reward, r.why, r.detail[:80]] for n, r in zip(names, results)},
        "restarts": pool.restarts,
        "good": good_reward,
        "mechanism": pool.process_cap.mechanism,
        "uid_tasks": uid_tasks,
        "elapsed": elapsed,
    }), flush=True)
"""


@pytest.fixture(scope="module")
def user() -> pwd.struct_passwd:
    """The unprivileged user mrlsbx (created once; kept, like any system account)."""
    try:
        return pwd.getpwnam(USER)
    except KeyError:
        pass
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", USER],
        check=True,
        capture_output=True,
    )
    return pwd.getpwnam(USER)


@pytest.fixture(scope="module")
def package_copy() -> Path:
    """megatron_rl/__init__.py and megatron_rl/rewards/ copied where any user can read them (the checkout may
    lie under a 0700 home)."""
    root = Path(tempfile.mkdtemp(prefix="megatron-rl-nonroot-"))
    os.chmod(root, 0o755)
    shutil.copytree(
        REWARDS_SRC, root / "megatron_rl" / "rewards", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(REPO / "megatron_rl" / "__init__.py", root / "megatron_rl" / "__init__.py")
    for path in [root, *root.rglob("*")]:
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _as_user(user: pwd.struct_passwd) -> dict:
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": [], "cwd": "/"}


@pytest.fixture(scope="module")
def busy_process(user: pwd.struct_passwd) -> int:
    """A process of the user holding 200 sleeping threads (a trainer's worth), for the whole module."""
    proc = subprocess.Popen(
        [SYSTEM_PYTHON, "-I", "-c", BUSY],
        stdout=subprocess.PIPE,
        env={"PATH": "/usr/bin:/bin"},
        **_as_user(user),
    )
    try:
        assert proc.stdout.readline().strip() == b"ready"
        assert len(os.listdir(f"/proc/{proc.pid}/task")) > BUSY_THREADS
        yield proc.pid
    finally:
        proc.kill()  # SIGKILL to the pid this fixture started
        proc.wait()
        proc.stdout.close()


@pytest.mark.parametrize("force", [None, UID_TASK_CAP], ids=["probed", "forced-uid-task-cap"])
def test_adversarial_suite_as_a_busy_ordinary_user(user, package_copy, busy_process, force) -> None:
    servers = LoopbackServers()
    digest_before = _tree_digest(REWARDS_SRC), _tree_digest(package_copy / "megatron_rl" / "rewards")
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(package_copy),
        "HOME": "/",
        "MEGATRON_RL_PLANTED_SECRET": SECRET,  # the workers inherit it; programs must not see it
    }
    scorer = subprocess.Popen(
        [SYSTEM_PYTHON, "-c", SCORER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        **_as_user(user),
    )
    try:
        hello = json.loads(scorer.stdout.readline() or "{}")
        assert hello, scorer.stderr.read()[-2000:]
        programs = attacks(
            servers.tcp.getsockname()[1],
            servers.udp.getsockname()[1],
            hello["root_dir"],
            hello["other_worker"],
        )
        scorer.stdin.write(json.dumps({"programs": programs, "force": force, "marker": M}) + "\n")
        scorer.stdin.flush()
        line = scorer.stdout.readline()
        assert line, scorer.stderr.read()[-2000:]
        report = json.loads(line)
        assert scorer.wait(timeout=30) == 0, scorer.stderr.read()[-2000:]
    finally:
        if scorer.poll() is None:
            scorer.kill()  # the pid this test started
            scorer.wait()
        for stream in (scorer.stdin, scorer.stdout, scorer.stderr):
            stream.close()
        servers.close()

    # The user really was busy: its uid held the busy process's 200 threads when the batch started.
    assert report["uid_tasks"] > BUSY_THREADS
    assert report["mechanism"] == (force or USERNS_NPROC)  # this machine's kernel counts per user namespace
    results = report["results"]
    assert len(results) == len(programs) >= 25
    assert all(r[0] == 0.0 for r in results.values()), {n: r for n, r in results.items() if r[0]}
    # ... and for the attack's sake, not because the harness broke (a crashed driver also scores 0; a driver the
    # program killed, possible in a persistent sandbox where the driver is not pid 1, is said as such).
    broken = {n: r for n, r in results.items() if r[1] == "sandbox_error" or "driver ended early" in r[2]}
    assert not broken, broken
    if force == UID_TASK_CAP:  # no kernel cap inside: the supervisor stopped them
        assert "process limit exceeded" in results["fork_bomb"][2]
    assert report["elapsed"] < 60, report["elapsed"]
    assert report["restarts"] == 0
    assert report["good"] == 1.0

    # Nothing of the runs is left: the user's only process is the busy one.
    deadline = time.monotonic() + 10
    while processes_of_uid(user.pw_uid) != [busy_process] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_of_uid(user.pw_uid) == [busy_process]
    assert servers.contacts == 0
    assert not os.path.exists(HOST_TMP_FILE)
    assert not (REPO / "PWNED.txt").exists()
    assert (
        _tree_digest(REWARDS_SRC),
        _tree_digest(package_copy / "megatron_rl" / "rewards"),
    ) == digest_before


def _doctor(user: pwd.struct_passwd, package_copy: Path, *prefix: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*prefix, SYSTEM_PYTHON, "-m", "megatron_rl.rewards.cli", "doctor", "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(package_copy), "HOME": "/"},
        **_as_user(user),
    )


def test_doctor_reports_the_mechanism_for_a_busy_user(user, package_copy, busy_process) -> None:
    done = _doctor(user, package_copy)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = dict(line.split(": ", 1) for line in done.stdout.splitlines())
    assert lines["mechanism"].startswith(USERNS_NPROC)
    assert int(lines["tasks of this uid"].split(";")[0]) > BUSY_THREADS
    assert {"bubblewrap", "user namespaces", "cgroup", "subordinate uids"} <= set(lines)


def test_doctor_refuses_in_one_line_without_room_under_the_hard_limit(user, package_copy) -> None:
    done = _doctor(user, package_copy, "prlimit", "--nproc=20")  # below 2 workers x 32 processes
    assert done.returncode == 1, done.stdout + done.stderr
    last = done.stdout.splitlines()[-1]
    assert last.startswith("mechanism: none: ") and "ulimit -Hu" in last and "raise nproc" in last


def test_no_user_namespaces_refuses_in_one_line(user, package_copy) -> None:
    """Inside a bwrap that forbids new user namespaces (--disable-userns), the doctor and the code reward both
    refuse with one line naming what to enable, and no program runs."""
    rows = package_copy / "rows.jsonl"
    good = "```python\nprint(sum(map(int, input().split())))\n```"
    rows.write_text(
        json.dumps({"response": good, "tests": [{"input": "2 3", "output": "5", "testtype": "stdin"}]})
    )
    os.chmod(rows, 0o644)
    no_userns = [
        shutil.which("bwrap"), "--unshare-user", "--disable-userns", "--die-with-parent",
        "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp",
        "--ro-bind", str(package_copy), str(package_copy), "--",
    ]  # fmt: skip
    done = _doctor(user, package_copy, *no_userns)
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1].startswith(
        "mechanism: none: the sandbox could not run a trivial program"
    )
    assert "user.max_user_namespaces" in done.stdout.splitlines()[-1]
    code = subprocess.run(
        [*no_userns, SYSTEM_PYTHON, "-m", "megatron_rl.rewards.cli", "code", str(rows), "--workers", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(package_copy), "HOME": "/"},
        **_as_user(user),
    )
    assert code.returncode == 3, code.stdout + code.stderr
    errors = [line for line in code.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "enable unprivileged user namespaces" in errors[0], code.stderr
    assert code.stdout == ""


# A HumanEval-style run whose solution starts a fork bomb in the background and keeps answering calls at once:
# the driver's supervisor must look at the sandbox's tasks while replies keep coming, not only when idle.
CHECK_BOMB = '''
import os, sys, tempfile
from megatron_rl.rewards.confinement import ProcessCap
from megatron_rl.rewards.sandbox import Sandbox

program = """
import os, threading
def bomb():
    if os.fork() == 0:
        while True:
            try:
                os.fork()
            except OSError:
                pass
threading.Thread(target=bomb).start()
def f(x):
    return x
"""
check = "def check(c):\\n    import time\\n    t = time.monotonic()\\n    while time.monotonic() - t < 1.5:\\n" \\
    "        assert c(1) == 1\\n"
root = tempfile.mkdtemp()
os.chmod(root, 0o711)
box = Sandbox(root, process_cap=ProcessCap(sys.argv[1]), concurrency=2)
run = box.run("check", program, {"timeout": 3, "entry_point": "f", "prelude": ""}, 8, secret={"test": check})
box.close()
os.rmdir(root)
print(run.records[0].get("why", "passed"))
'''


def test_check_style_fork_bomb_is_stopped_by_the_supervisor(user, package_copy, busy_process) -> None:
    done = subprocess.run(
        [SYSTEM_PYTHON, "-c", CHECK_BOMB, UID_TASK_CAP],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(package_copy), "HOME": "/"},
        **_as_user(user),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "process limit exceeded" in done.stdout, done.stdout
    deadline = time.monotonic() + 10
    while processes_of_uid(user.pw_uid) != [busy_process] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_of_uid(user.pw_uid) == [busy_process]
