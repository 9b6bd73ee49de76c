"""How the sandbox caps the number of processes of one program, chosen once per pool by probing this node.

RLIMIT_NPROC counts every task (process or thread) of a uid. Root gives each pool worker a uid of its own, so
the limit counts only that worker's sandbox. An ordinary user has one uid for the trainer's hundreds of threads
and every sandbox, so a fixed limit of 32 would stop bwrap from starting at all. Mechanisms, best first:

- ``dedicated-uids`` (root): RLIMIT_NPROC = the allowance, on a uid leased for the worker.
- ``userns-nproc`` (not root, Linux >= 5.14, where RLIMIT_NPROC is counted per user namespace): the sandbox is
  persistent; its pid 1, inside the sandbox's own user namespace, lowers its RLIMIT_NPROC to the allowance
  (plus itself) before anything forks. The kernel then refuses a fork once the sandbox itself holds the
  allowance, whatever the trainer holds. bwrap starts under the caller's own limit: the kernel also checks the
  uid's tasks on the node against the limit the namespace was created with, and a cap computed at launch
  would go stale as the trainer starts threads.
- ``uid-task-cap`` (not root, older kernels): a sandbox per program, started under a launch cap (the uid's
  tasks now + the allowance of every worker), which alone bounds the uid's total; the driver, as pid 1 of
  the sandbox's pid namespace, counts the namespace's tasks every 20 ms and kills them all once they exceed
  the allowance.

In every mechanism the driver also runs that task-count supervisor. The node must let an unprivileged user
create user namespaces (bwrap needs them), and the user's hard RLIMIT_NPROC must leave room for the launch cap;
otherwise `choose_process_cap` refuses with one line saying what to change.
"""

from __future__ import annotations

import logging
import os
import resource
from dataclasses import dataclass

logger = logging.getLogger(__name__)

DEDICATED_UIDS = "dedicated-uids"
USERNS_NPROC = "userns-nproc"
UID_TASK_CAP = "uid-task-cap"
MECHANISMS = (DEDICATED_UIDS, USERNS_NPROC, UID_TASK_CAP)

USERNS_HINT = (
    "enable unprivileged user namespaces for bubblewrap (sysctl user.max_user_namespaces=10000; "
    "kernel.unprivileged_userns_clone=1 on older Debian/Ubuntu; kernel.apparmor_restrict_unprivileged_userns=0 "
    "or an AppArmor profile for bwrap on Ubuntu 23.10+); `megatron-rl reward doctor` shows what this node "
    "supports"
)

# Runs inside the sandbox as the driver's only child (2 tasks in the namespace). With RLIMIT_NPROC 3, a kernel
# that counts per user namespace allows one fork (3 tasks) and refuses the next; one that counts the uid's
# tasks on the whole node (the worker, bwrap and the caller's other processes are >= 3 already) refuses both.
PROBE_PROGRAM = """
import os, resource
resource.setrlimit(resource.RLIMIT_NPROC, (3, 3))
r, w = os.pipe()
try:
    first = os.fork()
except OSError:
    print("per-uid")
else:
    if first == 0:
        os.read(r, 1)
        os._exit(0)
    try:
        second = os.fork()
    except OSError:
        print("per-namespace")
    else:
        if second == 0:
            os._exit(0)
        os.waitpid(second, 0)
        print("unenforced")
    os.write(w, b"x")
    os.waitpid(first, 0)
"""


@dataclass(frozen=True)
class ProcessCap:
    """The chosen mechanism; `inner_nproc`: the driver lowers RLIMIT_NPROC to the allowance inside."""

    mechanism: str
    detail: str = ""

    @property
    def inner_nproc(self) -> bool:
        return self.mechanism == USERNS_NPROC

    @property
    def persistent_sandbox(self) -> bool:
        """Whether a sandbox may serve many programs: its cap does not depend on the uid's tasks at launch."""
        return self.mechanism in (DEDICATED_UIDS, USERNS_NPROC)


def count_uid_tasks(uid: int) -> int:
    """Tasks (threads included) of the processes whose /proc entry belongs to uid. Non-dumpable processes
    (sandbox drivers and their programs) show as root there and are not counted: the launch cap leaves room
    for every worker's sandbox instead."""
    total = 0
    with os.scandir("/proc") as it:
        for entry in it:
            if not entry.name.isdigit():
                continue
            try:
                if entry.stat().st_uid != uid:
                    continue
                total += len(os.listdir(f"/proc/{entry.name}/task"))
            except OSError:
                continue
    return total


def launch_nproc(allowance: int, concurrent: int) -> int:
    """RLIMIT_NPROC for a sandbox started now by a non-root caller: the uid's tasks + room for every worker's
    sandbox, within the caller's hard limit."""
    want = count_uid_tasks(os.getuid()) + allowance * max(1, concurrent) + 1  # +1: bwrap's own process
    hard = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    return want if hard == resource.RLIM_INFINITY else min(want, hard)


def headroom_problem(allowance: int, concurrent: int) -> str | None:
    """One line when the caller's hard RLIMIT_NPROC leaves no room for `concurrent` sandboxes; else None."""
    hard = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    if hard == resource.RLIM_INFINITY:
        return None
    tasks = count_uid_tasks(os.getuid())
    need = tasks + allowance * max(1, concurrent) + 1
    if hard >= need:
        return None
    return (
        f"uid {os.getuid()} already runs {tasks} tasks and its hard process limit (ulimit -Hu) is {hard}: "
        f"{concurrent} sandbox workers of {allowance} processes need it at {need} or more; raise nproc for "
        "this user (/etc/security/limits.conf or the job's limits) or use fewer workers"
    )


def choose_process_cap(sandbox_root: str, allowance: int, concurrent: int, python: str) -> ProcessCap:
    """Probe this node and pick the mechanism; raise SandboxUnavailable with one line when none is safe."""
    from megatron_rl.rewards.sandbox import Sandbox, SandboxLimits, SandboxUnavailable, is_root

    if is_root():
        return ProcessCap(DEDICATED_UIDS, "each worker runs programs as a uid of its own")
    problem = headroom_problem(allowance, concurrent)
    if problem is not None:
        raise SandboxUnavailable(problem)
    box = Sandbox(sandbox_root, limits=SandboxLimits(processes=allowance), python=python)
    try:
        verdict = run_probe(box)
    finally:
        box.close()
    if verdict == "per-namespace":
        return ProcessCap(USERNS_NPROC, "the kernel counts RLIMIT_NPROC per user namespace")
    return ProcessCap(UID_TASK_CAP, f"the kernel counts RLIMIT_NPROC per uid ({verdict})")


def run_probe(box) -> str:
    """'per-namespace', 'per-uid' or 'unenforced' from PROBE_PROGRAM in a sandbox; SandboxUnavailable with one
    line when bwrap cannot run it."""
    from megatron_rl.rewards.sandbox import SandboxUnavailable

    res = box.run("stdin", PROBE_PROGRAM, {"timeout": 10, "cpu_seconds": 10, "inputs": [""]}, 20.0)
    out = res.records[0].get("out", "").strip() if res.records and res.records[0].get("ok") else ""
    if out in ("per-namespace", "per-uid", "unenforced"):
        return out
    said = " ".join(res.stderr.split())[-300:] or f"exit status {res.exit_status}"
    raise SandboxUnavailable(f"the sandbox could not run a trivial program ({said}): {USERNS_HINT}")


def log_choice(cap: ProcessCap) -> None:
    logger.info("code sandbox: process cap by %s (%s)", cap.mechanism, cap.detail)
