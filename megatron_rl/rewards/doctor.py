"""`megatron-rl reward doctor`: what this node offers the code sandbox, and the process cap a pool would use.

Prints one `name: value` line per fact, then `mechanism: ...`. Exit status 0 when code can be sandboxed here,
1 when it cannot (code would have to run unconfined), with the one-line reason.
"""

from __future__ import annotations

import os
import platform
import pwd
import resource
import shutil
import subprocess
import tempfile

from megatron_rl.rewards.confinement import choose_process_cap, count_uid_tasks
from megatron_rl.rewards.sandbox import (
    INSTALL_HINT,
    Sandbox,
    SandboxLimits,
    SandboxUnavailable,
    find_bwrap,
    is_root,
    probe_sandbox,
)

CGROUP_ROOT = "/sys/fs/cgroup"


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _limit(value: int) -> str:
    return "unlimited" if value == resource.RLIM_INFINITY else str(value)


def _bwrap_fact() -> str:
    path = find_bwrap()
    if path is None:
        return "missing (apt-get install bubblewrap)"
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    return f"{path} ({out or 'version unknown'})"


def _userns_fact() -> str:
    parts = [f"user.max_user_namespaces={_read('/proc/sys/user/max_user_namespaces') or '?'}"]
    for name in ("kernel/unprivileged_userns_clone", "kernel/apparmor_restrict_unprivileged_userns"):
        value = _read(f"/proc/sys/{name}")
        if value is not None:
            parts.append(f"{name.replace('/', '.')}={value}")
    return ", ".join(parts)


def _cgroup_fact() -> str:
    controllers = _read(os.path.join(CGROUP_ROOT, "cgroup.controllers"))
    if controllers is None:
        return f"no unified hierarchy at {CGROUP_ROOT} (cgroup v1 or hybrid); not used by the sandbox"
    own = next(
        (line[3:] for line in (_read("/proc/self/cgroup") or "").splitlines() if line.startswith("0::")), ""
    )
    path = os.path.join(CGROUP_ROOT, own.lstrip("/"))
    delegated = os.access(os.path.join(path, "cgroup.subtree_control"), os.W_OK)
    mine = _read(os.path.join(path, "cgroup.controllers")) or ""
    return (
        f"v2, this process in {own or '/'} (controllers: {mine or 'none'}; "
        f"{'delegated to this user' if delegated else 'not delegated'}); not used by the sandbox"
    )


def _subuid_fact(user: str) -> str:
    ranges = [line for line in (_read("/etc/subuid") or "").splitlines() if line.split(":")[0] == user]
    tool = shutil.which("newuidmap")
    return (
        f"{', '.join(ranges) or 'none for ' + user} in /etc/subuid; newuidmap {tool or 'missing'}; "
        "not used by the sandbox"
    )


def facts() -> list[tuple[str, str]]:
    """(name, value) lines about this node and caller."""
    uid = os.getuid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    soft, hard = resource.getrlimit(resource.RLIMIT_NPROC)
    return [
        ("bubblewrap", _bwrap_fact()),
        ("kernel", platform.release()),
        ("user", f"{user} (uid {uid}{', root: programs run as leased uids' if is_root() else ''})"),
        (
            "tasks of this uid",
            f"{count_uid_tasks(uid)}; RLIMIT_NPROC soft {_limit(soft)}, hard {_limit(hard)}",
        ),
        ("user namespaces", _userns_fact()),
        ("cgroup", _cgroup_fact()),
        ("subordinate uids", _subuid_fact(user)),
    ]


def doctor_main(workers: int | None = None, python: str = "/usr/bin/python3") -> int:
    """Print the facts and the mechanism; 0 when code can be sandboxed here, 1 when it cannot."""
    from megatron_rl.rewards.pool import default_workers

    for name, value in facts():
        print(f"{name}: {value}")
    workers = workers or default_workers()
    root = tempfile.mkdtemp(prefix="megatron-rl-doctor-")
    os.chmod(root, 0o711)
    try:
        if find_bwrap() is None:
            raise SandboxUnavailable(INSTALL_HINT)
        cap = choose_process_cap(root, SandboxLimits().processes, workers, python)
        if is_root():  # the probe above ran nothing as root: run a trivial program as a leased uid
            box = Sandbox(root, python=python)
            try:
                probe_sandbox(box)
            finally:
                box.close()
    except SandboxUnavailable as e:
        print(f"mechanism: none: {e}")
        return 1
    finally:
        shutil.rmtree(root, ignore_errors=True)
    sandboxes = "a persistent sandbox each" if cap.persistent_sandbox else "a sandbox per program"
    print(f"mechanism: {cap.mechanism} ({cap.detail}; {workers} workers, {sandboxes})")
    return 0
