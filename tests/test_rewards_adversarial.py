"""Adversarial programs in the real bubblewrap sandbox.

Each program prints (or returns) its success marker only if its attack worked, and the marker is the test's
expected output: a reward of 1 would mean the attack succeeded. Every one must score 0, and afterwards the
harness must be unharmed (no worker lost, the pool still scores a good program 1), no process of the sandbox
uids may be left, and nothing on the host may have changed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

from megatron_rl.rewards import RewardPool, Sandbox, parse_tests
from megatron_rl.rewards.sandbox import UidLease, _children_of, is_root, processes_of_uid

REPO = Path(__file__).resolve().parents[1]
REWARDS_SRC = REPO / "megatron_rl" / "rewards"
SECRET = "megatron-rl-test-secret-" + uuid.uuid4().hex
HOST_TMP_FILE = f"/tmp/megatron-rl-pwned-{uuid.uuid4().hex}"
M = "PWNED"  # the success marker


def attacks(port: int, udp_port: int, root_dir: str, other_uid: int) -> dict[str, str]:
    """name -> program. Programs print M only if the attack worked."""
    return {
        "connect_loopback": f"""
import socket
s = socket.create_connection(("127.0.0.1", {port}), timeout=2)
s.recv(10)
print("{M}")""",
        "connect_external": """
import socket
for addr in [("1.1.1.1", 53), ("8.8.8.8", 53), ("151.101.0.223", 443)]:
    try:
        socket.create_connection(addr, timeout=2)
        print("PWNED")
        break
    except OSError:
        pass""",
        "udp_loopback": f"""
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2)
s.sendto(b"leak", ("127.0.0.1", {udp_port}))  # the sandbox has its own loopback: this goes nowhere
s.recvfrom(10)  # the host's listener would answer
print("{M}")""",
        "dns_lookup": f"""
import socket
socket.getaddrinfo("pypi.org", 443)
print("{M}")""",
        "read_etc_shadow": f"""
print(open("/etc/shadow").read()[:0] + "{M}")""",
        "read_etc_passwd": f"""
print(open("/etc/passwd").read()[:0] + "{M}")""",
        "read_project_files": f"""
open({str(REPO / "pyproject.toml")!r}).read()
print("{M}")""",
        "list_root_home": f"""
import os
os.listdir("/root")
print("{M}")""",
        "read_other_workers_dirs": f"""
import os
found = os.listdir({root_dir!r}) + os.listdir({os.path.join(root_dir, f"w{other_uid}")!r})
print("{M}")""",
        "read_parent_environment": f"""
import os, glob
seen = list(os.environ.values())
for path in glob.glob("/proc/*/environ"):
    try:
        seen.append(open(path, "rb").read().decode(errors="replace"))
    except OSError:
        pass
print("{M}" if any({SECRET!r} in s for s in seen) else "not found")""",
        "see_host_processes": f"""
import os
cmds = []
for p in os.listdir("/proc"):
    if p.isdigit():
        try:
            cmds.append(open(f"/proc/{{p}}/cmdline", "rb").read())
        except OSError:
            pass
print("{M}" if any(b"pytest" in c or b"rewards.worker" in c for c in cmds) else "nothing")""",
        "write_outside_workdir": f"""
import os
open("/sandbox/ok.txt", "w").write("fine")  # the work dir is writable
open({HOST_TMP_FILE!r}, "w").write("private /tmp: must not reach the host")
for path in [{str(REPO / "PWNED.txt")!r}, "/usr/x.txt", "/root/x.txt", "/etc/x.txt", "/x.txt"]:
    try:
        open(path, "w").write("x")
        print("{M}")
        break
    except OSError:
        pass""",
        "modify_harness_files": f"""
import os
hit = False
for path in ["/harness/driver.py", "/harness/program.py", {str(REWARDS_SRC / "sandbox_driver.py")!r},
             {str(REWARDS_SRC / "sandbox.py")!r}]:
    try:
        open(path, "a").write("\\nraise SystemExit(0)\\n")
        hit = True
    except OSError:
        pass
    try:
        os.chmod(path, 0o777)
        hit = True
    except OSError:
        pass
print("{M}" if hit else "no")""",
        "fork_bomb": f"""
import os
while True:
    try:
        os.fork()
    except OSError:
        pass
print("{M}")""",
        "busy_loop": f"""
while True:
    pass
print("{M}")""",
        "allocate_10GB": f"""
x = bytearray(10 << 30)
print("{M}")""",
        "flood_stdout_1GB": f"""
import sys
chunk = "x" * (1 << 20)
for _ in range(1024):
    sys.stdout.write(chunk)
print("{M}")""",
        "flood_stderr_1GB": f"""
import os
chunk = b"x" * (1 << 20)
for _ in range(1024):
    os.write(2, chunk)
print("{M}")""",
        "sleep_forever": f"""
import time
time.sleep(10**6)
print("{M}")""",
        "daemon_outlives_run": f"""
import os, sys, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        time.sleep(0.5)
        print("{M}", flush=True)  # too late: the test is over
        time.sleep(60)
    os._exit(0)""",
        "kill_parent": f"""
import os, signal, time
os.kill(os.getppid(), signal.SIGKILL)
time.sleep(0.2)
try:
    os.kill(os.getppid(), 0)
except OSError:
    print("{M}")""",
        "kill_process_group": f"""
import os, signal
os.killpg(0, signal.SIGKILL)
print("{M}")""",
        "kill_every_visible_pid": f"""
import os, signal
for p in os.listdir("/proc"):
    if p.isdigit() and int(p) != os.getpid():
        try:
            os.kill(int(p), signal.SIGKILL)
        except OSError:
            pass
try:
    os.kill(1, 0)  # is the driver (pid 1) still there?
except OSError:
    print("{M}")""",
        "ctypes_segfault": f"""
import ctypes
ctypes.string_at(0)
print("{M}")""",
        "recursion_overflow": f"""
import sys
sys.setrecursionlimit(10**9)
def f(n):
    return f(n + 1) + 1
f(0)
print("{M}")""",
        "become_root": f"""
import os
os.setuid(0)
print("{M}")""",
        "ptrace_the_driver": f"""
import ctypes
libc = ctypes.CDLL(None)
if libc.ptrace(16, 1, 0, 0) == 0:  # PTRACE_ATTACH to pid 1
    print("{M}")""",
        "open_driver_channel": f"""
for path in ["/proc/1/fd/3", "/proc/1/mem", "/proc/1/environ"]:
    try:
        open(path, "rb").close()
        print("{M}")
        break
    except OSError:
        pass""",
        "new_user_namespace": f"""
import ctypes
if ctypes.CDLL(None).unshare(0x10000000) == 0:  # CLONE_NEWUSER
    print("{M}")""",
        "mount_tmpfs_over_usr": f"""
import ctypes
if ctypes.CDLL(None).mount(b"none", b"/usr", b"tmpfs", 0, None) == 0:
    print("{M}")""",
        "huge_file": f"""
with open("/sandbox/big.bin", "wb") as f:
    for _ in range(1024):
        f.write(b"\\0" * (1 << 20))
print("{M}")""",
        "many_processes_filling_memory": f"""
import os, time
for _ in range(7):
    if os.fork() == 0:
        break
x = b"\\1" * (400 << 20)  # 8 processes x 400 MB resident: over the sandbox's 1 GB in total
time.sleep(3)
print("{M}")""",
        "thousand_threads": f"""
import threading, time
ts = [threading.Thread(target=time.sleep, args=(1,)) for _ in range(1000)]
for t in ts:
    t.start()
print("{M}")""",
        "exhaust_file_descriptors": f"""
fs = [open("/dev/null") for _ in range(10000)]
print("{M}")""",
    }


class LoopbackServers:
    """A TCP server and a UDP listener on the host's 127.0.0.1 that answer anyone: nobody may reach them."""

    def __init__(self) -> None:
        self.tcp = socket.create_server(("127.0.0.1", 0))
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.udp.settimeout(0.2)
        self.tcp.settimeout(0.2)
        self.contacts = 0
        self.stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop:
            try:
                conn, _ = self.tcp.accept()
                self.contacts += 1
                conn.sendall(b"hello")
                conn.close()
            except OSError:
                pass
            try:
                _, peer = self.udp.recvfrom(100)
                self.contacts += 1
                self.udp.sendto(b"hello", peer)
            except OSError:
                pass

    def close(self) -> None:
        self.stop = True
        self.thread.join()
        self.tcp.close()
        self.udp.close()


def _tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.glob("*.py")):
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def _live_processes(uids: list[int]) -> list[int]:
    live = []
    for uid in uids:
        for pid in processes_of_uid(uid):
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if state != "Z":
                live.append(pid)
    return live


def _not_persistent_sandboxes(pids: list[int]) -> list[tuple[int, int, str]]:
    """(pid, parent, cmdline) of each pid that is neither a bwrap process nor a sandbox zygote (pid 1 of its
    namespace, the driver in serve mode), or that has a zygote for its parent."""
    cmdlines = {pid: Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") for pid in pids}
    parents = {pid: int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]) for pid in pids}
    zygotes = {pid for pid, argv in cmdlines.items() if b"serve" in argv and parents[pid] in pids}
    bwraps = {pid for pid, argv in cmdlines.items() if argv[0].endswith(b"bwrap")}
    return [
        (pid, parents[pid], b" ".join(cmdlines[pid])[:120].decode(errors="replace"))
        for pid in pids
        if pid not in zygotes | bwraps or parents[pid] in zygotes
    ]


@pytest.mark.skipif(not is_root(), reason="per-worker sandbox uids need root (CI runs as root)")
def test_adversarial_programs_are_contained(monkeypatch) -> None:
    monkeypatch.setenv(
        "MEGATRON_RL_PLANTED_SECRET", SECRET
    )  # the workers inherit it; programs must not see it
    servers = LoopbackServers()
    digest_before = _tree_digest(REWARDS_SRC)
    try:
        with RewardPool(workers=2, code_timeout=2.0) as pool:
            programs = attacks(
                servers.tcp.getsockname()[1], servers.udp.getsockname()[1], pool.root_dir, pool.uids[1]
            )
            assert len(programs) >= 25
            names = list(programs)
            tests = parse_tests([{"input": "", "output": M, "testtype": "stdin"}])
            start = time.monotonic()
            results = pool.run_programs([programs[n] for n in names], [tests] * len(names))
            elapsed = time.monotonic() - start
            scored = {n: (r.reward, r.why, r.detail[:80]) for n, r in zip(names, results, strict=True)}
            assert all(r.reward == 0.0 for r in results), {n: v for n, v in scored.items() if v[0]}
            assert elapsed < 60, elapsed

            # The harness is unharmed: no worker was lost, and the same pool still scores a good program.
            assert pool.restarts == 0
            good = parse_tests([{"input": "2 3", "output": "5", "testtype": "stdin"}])
            assert pool.run_programs(["print(sum(map(int, input().split())))"], [good])[0].reward == 1.0

            # Nothing of the runs is left: under the sandbox uids live only each worker's persistent sandbox,
            # bwrap and its pid 1 (the zygote), and nothing else is in the zygote's namespace.
            assert _not_persistent_sandboxes(_live_processes(pool.uids)) == []
            uids = pool.uids
        deadline = time.monotonic() + 10
        while any(processes_of_uid(u) for u in uids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(processes_of_uid(u) for u in uids)
    finally:
        servers.close()
    assert servers.contacts == 0
    assert not os.path.exists(HOST_TMP_FILE)
    assert not (REPO / "PWNED.txt").exists()
    assert _tree_digest(REWARDS_SRC) == digest_before


@pytest.mark.skipif(not is_root(), reason="per-worker sandbox uids need root (CI runs as root)")
def test_each_worker_runs_programs_as_its_own_unprivileged_uid() -> None:
    root = tempfile.mkdtemp(
        prefix="megatron-rl-test-"
    )  # the sandbox uid must be able to traverse its parents
    os.chmod(root, 0o711)
    leases = [UidLease.acquire(), UidLease.acquire()]
    try:
        assert leases[0].uid != leases[1].uid
        for lease in leases:
            box = Sandbox(root, uid=lease.uid)
            prog = "import os\nprint(os.getuid(), os.getgid(), os.getgroups(), os.getcwd())"
            run = box.run("stdin", prog, {"timeout": 5, "cpu_seconds": 5, "inputs": [""]}, 10)
            uid, gid, groups, cwd = run.records[0]["out"].split()
            assert (int(uid), int(gid), groups, cwd) == (lease.uid, lease.uid, "[]", "/sandbox")
            box.close()
    finally:
        for lease in leases:
            lease.release()
        shutil.rmtree(root)


# A program that leaves everything it can in a persistent sandbox: files in each writable place, a System V
# shared memory segment, semaphore set and message queue, and a daemon in a session of its own.
LEAVE_STATE = """
import ctypes, os, time
libc = ctypes.CDLL(None, use_errno=True)
for d in ("/tmp", "/sandbox", "/dev/shm"):
    os.makedirs(d + "/left/deep", exist_ok=True)
    open(d + "/left/deep/file", "w").write("x")
    os.chmod(d + "/left", 0)
os.chmod("/sandbox", 0)
print(libc.shmget(0, 1 << 20, 0o1600) >= 0, libc.semget(0, 1, 0o1600) >= 0, libc.msgget(0, 0o1600) >= 0)
if os.fork() == 0:
    os.setsid()
    time.sleep(600)
"""

LOOK_FOR_STATE = """
import os
found = [d for d in ("/tmp", "/sandbox", "/dev/shm") if os.path.exists(d + "/left")]
ipc = [k for k in ("shm", "sem", "msg") if open("/proc/sysvipc/" + k).read().count("\\n") > 1]
others = [p for p in os.listdir("/proc") if p.isdigit() and int(p) not in (1, os.getpid(), os.getppid())]
try:
    open("/dev/new", "w")
    dev = "writable"
except OSError:
    dev = "read-only"
print(found, ipc, others, oct(os.stat("/sandbox").st_mode & 0o7777), dev)
"""

SHM_HOARD = """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
for _ in range(64):  # 64 segments of 64 MiB, each touched then detached: resident in no process
    shm = libc.shmget(0, 64 << 20, 0o1600)
    addr = libc.shmat(shm, None, 0)
    ctypes.memset(addr, 1, 64 << 20)
    libc.shmdt(ctypes.c_void_p(addr))
print("hoarded")
"""


@pytest.mark.skipif(not is_root(), reason="per-worker sandbox uids need root (CI runs as root)")
def test_a_persistent_sandbox_starts_each_program_as_the_first() -> None:
    root = tempfile.mkdtemp(prefix="megatron-rl-test-")
    os.chmod(root, 0o711)
    lease = UidLease.acquire()
    box = Sandbox(root, uid=lease.uid)
    spec = {"timeout": 5, "cpu_seconds": 5, "inputs": [""]}
    try:
        assert box.persistent
        left = box.run("stdin", LEAVE_STATE, spec, 10)
        assert left.records[0]["out"].split() == ["True", "True", "True"], left
        zygote = box._zygote.proc.pid
        seen = box.run("stdin", LOOK_FOR_STATE, spec, 10)
        assert seen.records[0]["out"].strip() == "[] [] [] 0o700 read-only", seen
        assert box._zygote.proc.pid == zygote  # the same sandbox ran both programs

        # Shared memory that no process holds still counts against the sandbox's memory budget.
        hoard = box.run("stdin", SHM_HOARD, spec, 10)
        assert not any(r.get("out") == "hoarded\n" for r in hoard.records), hoard
        assert "memory limit exceeded" in str(hoard.records) + hoard.ended, hoard
        assert box.run("stdin", LOOK_FOR_STATE, spec, 10).records[0]["out"].startswith("[] [] []")

        # A sandbox that died between programs (here: its pid 1 killed, as the OOM killer might) is replaced,
        # and the program runs.
        (pid_1,) = _children_of(box._zygote.proc.pid)
        os.kill(pid_1, signal.SIGKILL)
        box._zygote.proc.wait()
        assert box.run("stdin", "print(6 * 7)", spec, 10).records[0] == {"i": 0, "ok": True, "out": "42\n"}
    finally:
        box.close()
        lease.release()
        shutil.rmtree(root)
    assert processes_of_uid(lease.uid) == []
