"""Run untrusted Python programs under bubblewrap, rlimits, a dedicated uid and a wall-clock kill.

Layers, outermost first:
- as root, a uid of its own per pool worker (leased with a lock file, so two pools never share one): rlimits
  such as RLIMIT_NPROC count per uid, root is exempt from them, and a leftover process can be found and killed
  by uid. Not root, programs run as the caller's uid and the process cap comes from `confinement.py`;
- rlimits set between fork and exec: address space, processes, file size, open files, no core, no POSIX
  message queues; CPU seconds per program;
- bubblewrap namespaces: no network, a new pid namespace whose pid 1 is ours (everything dies with it), only
  /usr visible (read-only), a read-only /dev, private size-limited tmpfs for /dev/shm, /tmp and the work dir
  /sandbox, the harness files read-only under /harness, empty environment, no capabilities, no nested user
  namespaces;
- a wall-clock deadline after which the program's processes are SIGKILLed.

Where the process cap does not depend on the moment of launch (a uid of its own, or the userns-nproc
mechanism), one sandbox serves many programs: its pid 1 (the driver in serve mode, "the zygote") forks a
driver per program and, after each, kills every other process, empties the writable places and removes IPC
objects (see sandbox_driver.py). Otherwise bwrap starts per program with the driver as pid 1.

Without bwrap, `Sandbox` refuses to start unless `allow_unsandboxed=True`, and then logs a loud warning.
"""

from __future__ import annotations

import fcntl
import json
import logging
import marshal
import os
import resource
import select
import selectors
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from megatron_rl.rewards.confinement import DEDICATED_UIDS, UID_TASK_CAP, ProcessCap, launch_nproc

logger = logging.getLogger(__name__)

RECYCLE_RUNS = 1000  # a persistent sandbox is replaced by a fresh one after this many programs
END_GRACE = 2.0  # seconds past a run's wall-clock limit before its persistent sandbox counts as unresponsive
SANDBOX_GONE = "the sandbox ended unexpectedly"

DRIVER_SOURCE = Path(__file__).with_name("sandbox_driver.py")
SANDBOX_PYTHON = "/usr/bin/python3"
UID_BASE = 61000
UID_COUNT = 2000
UID_LOCK_DIR = "/tmp/megatron-rl-sandbox-uids"
INSTALL_HINT = (
    "bubblewrap (bwrap) is not installed, so untrusted code cannot be sandboxed. Install it with "
    "`apt-get install bubblewrap` (or `make system-deps` as root), or pass allow_unsandboxed=True / "
    "--unsafe-no-sandbox to run programs WITHOUT isolation."
)


class SandboxUnavailable(RuntimeError):
    """bubblewrap is missing or cannot create namespaces here, and unsandboxed runs were not allowed."""


@dataclass(frozen=True)
class SandboxLimits:
    memory_mb: int = 1024  # RLIMIT_AS per process, and the driver's cap on the sandbox's total RSS
    processes: int = 32  # tasks (processes and threads) of one sandbox, driver included: see confinement.py
    file_size_mb: int = 16  # RLIMIT_FSIZE: also caps a test's captured stdout
    open_files: int = 128  # RLIMIT_NOFILE
    tmpfs_mb: int = 64  # size of each of the private /tmp and /sandbox
    channel_mb: int = 128  # results bigger than this are not buffered: the run fails


@dataclass
class RunResult:
    records: list[dict] = field(default_factory=list)
    timed_out: bool = False
    stopped_early: bool = False
    exit_status: int | None = None
    stderr: str = ""
    seconds: float = 0.0
    error: str | None = None  # the harness's own trouble (bad channel data, oversize output)
    ended: str = ""  # why a persistent sandbox ended the run early: a budget exceeded, the driver killed


def find_bwrap() -> str | None:
    return shutil.which("bwrap")


def is_root() -> bool:
    return os.geteuid() == 0


# --------------------------------------------------------------------------------------------------
# uid leases and leftovers


class UidLease:
    """Exclusive use of one sandbox uid while this object lives (an flock on a per-uid lock file)."""

    def __init__(self, uid: int, fd: int) -> None:
        self.uid, self._fd = uid, fd

    @classmethod
    def acquire(cls, base: int = UID_BASE, count: int = UID_COUNT, lock_dir: str = UID_LOCK_DIR) -> UidLease:
        os.makedirs(lock_dir, mode=0o700, exist_ok=True)
        for uid in range(base, base + count):
            fd = os.open(os.path.join(lock_dir, f"{uid}.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            return cls(uid, fd)
        raise SandboxUnavailable(f"no free sandbox uid in [{base}, {base + count})")

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def processes_of_uid(uid: int) -> list[int]:
    """Pids whose real uid is uid (read from /proc)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"Uid:"):
                        if int(line.split()[1]) == uid:
                            pids.append(int(entry))
                        break
        except (OSError, ValueError, IndexError):
            continue
    return pids


def kill_uid_processes(uid: int) -> int:
    """SIGKILL every process of a leased sandbox uid, one pid at a time. Only for uids this process leased."""
    if uid == os.getuid() or uid == 0:
        raise ValueError("refusing to kill the processes of our own uid or of root")
    n = 0
    for _ in range(5):  # a fork bomb may be forking while we scan
        pids = processes_of_uid(uid)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                n += 1
            except OSError:
                pass
        time.sleep(0.01)
    return n


# --------------------------------------------------------------------------------------------------


def _child_rlimits(limits: SandboxLimits, cpu_seconds: int | None, nproc: int | None) -> Callable[[], None]:
    """rlimits for bwrap and everything under it; None leaves the caller's limit as it is."""
    mb = 1 << 20
    table = [
        (resource.RLIMIT_AS, limits.memory_mb * mb),
        (resource.RLIMIT_CPU, cpu_seconds),
        (resource.RLIMIT_NPROC, nproc),
        (resource.RLIMIT_FSIZE, limits.file_size_mb * mb),
        (resource.RLIMIT_NOFILE, limits.open_files),
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_MSGQUEUE, 0),  # no POSIX message queues: they would outlive a program's processes
    ]
    table = [(which, value) for which, value in table if value is not None]

    def apply() -> None:  # runs in the forked child, after the switch to the sandbox uid, before exec
        for which, value in table:
            resource.setrlimit(which, (value, value))

    return apply


def _wait_exit(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait until proc has exited (without reaping it), up to timeout. Popen.wait(timeout) polls with sleeps
    that grow to 50 ms, which would add milliseconds to every run; a pidfd wakes us when it happens."""
    if proc.poll() is not None:
        return True
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        try:
            proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def _children_of(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except (OSError, ValueError):
        return []


class Sandbox:
    """Runs programs one at a time: a uid, a harness dir, and bwrap (or, only if allowed, nothing)."""

    def __init__(
        self,
        root_dir: str,
        uid: int | None = None,
        limits: SandboxLimits | None = None,
        allow_unsandboxed: bool = False,
        bwrap: str | None = "auto",
        python: str = SANDBOX_PYTHON,
        process_cap: ProcessCap | None = None,
        concurrency: int = 1,
        persistent: bool | None = None,
    ) -> None:
        """process_cap: how a non-root caller caps the program's processes (default: the launch cap and the
        driver's supervisor, which need nothing from the kernel); concurrency: how many sandboxes of this
        caller may run at once (the launch cap leaves room for each); persistent: one sandbox for many
        programs (default: wherever the process cap does not depend on the moment of launch, i.e. with a uid
        of its own or the userns-nproc mechanism)."""
        self.limits = limits or SandboxLimits()
        self.bwrap = find_bwrap() if bwrap == "auto" else bwrap
        if self.bwrap is not None and not os.access(self.bwrap, os.X_OK):
            self.bwrap = None
        if self.bwrap is None:
            if not allow_unsandboxed:
                raise SandboxUnavailable(INSTALL_HINT)
            logger.warning(
                "WARNING: RUNNING UNTRUSTED CODE WITHOUT A SANDBOX (bubblewrap missing, unsafe mode "
                "requested): programs can read and write this machine's files and use its network."
            )
        if not os.path.exists(python):
            raise SandboxUnavailable(f"{python} is missing: the sandbox runs programs with the system python")
        self.python = python
        # Root runs programs as a uid of their own (never as root: root ignores RLIMIT_NPROC, and more);
        # anyone else can only use their own uid.
        self._lease: UidLease | None = None
        if is_root() and uid is None:
            self._lease = UidLease.acquire()
            uid = self._lease.uid
        self.uid = uid if is_root() else None
        if self.uid is not None:
            process_cap = ProcessCap(DEDICATED_UIDS, "a uid of its own")
        self.process_cap = process_cap or ProcessCap(UID_TASK_CAP, "launch cap and supervisor")
        self.concurrency = max(1, concurrency)
        self.dir = os.path.join(root_dir, f"w{uid if uid is not None else os.getpid()}")
        self.harness = os.path.join(self.dir, "harness")
        shutil.rmtree(self.dir, ignore_errors=True)
        os.makedirs(self.harness, mode=0o711)
        os.chmod(self.dir, 0o711)
        os.chmod(self.harness, 0o711)  # traversable (bwrap binds it as the sandbox uid), not listable
        self._compile_driver()
        self.runs = 0
        if persistent is None:
            persistent = self.process_cap.persistent_sandbox
        self.persistent = bool(persistent and self.sandboxed)
        self._zygote: _Zygote | None = None

    def _compile_driver(self) -> None:
        """Byte-compile the driver once with the sandbox's python: compiling its source on every run would
        cost ~5 ms per program (the harness dir is read-only inside, so python could not cache it there)."""
        src = os.path.join(self.harness, "driver.py")
        shutil.copyfile(DRIVER_SOURCE, src)
        code = "import py_compile, sys; py_compile.compile(sys.argv[1], cfile=sys.argv[2], doraise=True)"
        proc = subprocess.run(
            [self.python, "-I", "-c", code, src, src + "c"], capture_output=True, text=True, timeout=60
        )
        if proc.returncode != 0:
            raise SandboxUnavailable(f"{self.python} cannot compile the sandbox driver: {proc.stderr[-500:]}")
        for name in ("driver.py", "driver.pyc"):
            os.chmod(os.path.join(self.harness, name), 0o644)

    @property
    def sandboxed(self) -> bool:
        return self.bwrap is not None

    def close(self) -> None:
        self._stop_zygote()
        shutil.rmtree(self.dir, ignore_errors=True)
        if self._lease is not None:
            kill_uid_processes(self._lease.uid)
            self._lease.release()
            self._lease = None

    # -- building the command ----------------------------------------------------------------------

    def _bwrap_argv(self, style: str) -> list[str]:
        tmpfs = str(self.limits.tmpfs_mb << 20)
        return [
            self.bwrap,
            "--unshare-all",  # user, ipc, pid, net, uts, cgroup: no network (only a loopback of its own)
            "--unshare-user",
            "--disable-userns",
            "--die-with-parent",
            "--new-session",
            "--as-pid-1",  # the driver is pid 1: the namespace (and every leftover) dies with it
            "--cap-drop", "ALL",
            "--clearenv",
            "--setenv", "PATH", "/usr/bin:/bin",
            "--setenv", "HOME", "/sandbox",
            "--setenv", "LANG", "C.UTF-8",
            "--setenv", "MALLOC_ARENA_MAX", "2",  # glibc reserves 64 MB of address space per thread arena
            "--ro-bind", "/usr", "/usr",
            "--symlink", "usr/lib", "/lib",
            "--symlink", "usr/lib64", "/lib64",
            "--symlink", "usr/bin", "/bin",
            "--proc", "/proc",
            "--dev", "/dev",
            # bwrap's /dev is a tmpfs with no size limit, writable by the program: files there would hold memory
            # that no process's RSS shows. A small /dev/shm of its own (POSIX semaphores need one), the rest
            # read-only.
            "--size", tmpfs, "--perms", "1777", "--tmpfs", "/dev/shm",
            "--remount-ro", "/dev",
            "--size", tmpfs, "--perms", "1777", "--tmpfs", "/tmp",
            "--size", tmpfs, "--perms", "0700", "--tmpfs", "/sandbox",
            "--ro-bind", self.harness, "/harness",
            "--remount-ro", "/",  # the root itself (bwrap's tmpfs) is not a place to write either
            "--chdir", "/sandbox",
            "--",
            self.python, "-I", "-B", "/harness/driver.pyc", style, "/harness", "/tmp",
        ]  # fmt: skip

    def _prepare(self, program: str) -> None:
        path = os.path.join(self.harness, "program.py")
        tmp = path + ".new"
        with open(tmp, "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write(program)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)

    def _fresh_run_dir(self) -> str:
        """Unsafe mode only: a new work dir per run, owned by the program's uid."""
        run_dir = os.path.join(self.dir, "run")
        shutil.rmtree(run_dir, ignore_errors=True)
        os.mkdir(run_dir, 0o700)
        if self.uid is not None:
            os.chown(run_dir, self.uid, self.uid)
        return run_dir

    # -- running -----------------------------------------------------------------------------------

    def run(
        self,
        style: str,
        program: str,
        spec: dict,
        wall_timeout: float,
        on_record: Callable[[dict], bool] | None = None,
        secret: dict | None = None,
    ) -> RunResult:
        """Run program with the driver in `style`; feed it spec; pass each result record to on_record.

        spec is what the driver may know before the solution starts; secret (the check code of the check
        style) is sent after the solution's process was forked. on_record returns False to stop the run (the
        first failing test): the program's processes are then killed at once.
        """
        self.runs += 1
        self._prepare(program)
        # marshal: the driver decodes it without importing json (whose import alone costs ~5 ms per run)
        spec = {**spec, **self._budgets()}
        frames = [marshal.dumps(spec, 4), marshal.dumps(secret or {}, 4)]
        spec_bytes = b"".join(len(f).to_bytes(8, "little") + f for f in frames)
        started = time.monotonic()
        if self.persistent:
            result = self._run_in_zygote(style, spec_bytes, wall_timeout, on_record)
        else:
            result = self._run_in_fresh_sandbox(style, spec_bytes, wall_timeout, on_record)
        result.seconds = time.monotonic() - started
        return result

    def _budgets(self) -> dict:
        """The driver's budgets for the whole sandbox: resident memory and tasks (its supervisor kills past
        them); with nproc it also lowers its own RLIMIT_NPROC, which this kernel then counts in the sandbox
        only. A persistent sandbox holds one task more than the program's allowance: the zygote."""
        tasks = self.limits.processes + (1 if self.persistent else 0)
        inner = self.sandboxed and self.uid is None and self.process_cap.inner_nproc
        return {"memory_kb": self.limits.memory_mb * 1024, "max_tasks": tasks, "nproc": tasks if inner else 0}

    def _popen(self, argv: list[str], cwd: str, stdin, rlimits: Callable[[], None]) -> subprocess.Popen:
        kwargs: dict = {}
        if self.uid is not None:
            kwargs.update(user=self.uid, group=self.uid, extra_groups=[])
        return subprocess.Popen(
            argv,
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
            close_fds=True,
            start_new_session=True,
            preexec_fn=rlimits,
            **kwargs,
        )

    # -- a sandbox per program (unsafe mode, and the uid-task-cap mechanism) ------------------------------

    def _run_in_fresh_sandbox(
        self, style: str, spec_bytes: bytes, wall_timeout: float, on_record: Callable[[dict], bool] | None
    ) -> RunResult:
        """bwrap (or, unsafe, a bare python) started for this program alone; the spec goes to its stdin."""
        cpu_seconds = int(wall_timeout) + 1
        if self.uid is not None:
            nproc = self.limits.processes  # a uid of its own: the limit counts this sandbox only
        else:
            nproc = launch_nproc(self.limits.processes, self.concurrency)  # the uid's tasks as they are now
        run_dir = None
        if self.sandboxed:
            argv, cwd = self._bwrap_argv(style), "/"
        else:
            run_dir = self._fresh_run_dir()
            driver = os.path.join(self.harness, "driver.pyc")
            argv = [self.python, "-I", "-B", driver, style, self.harness, run_dir]
            cwd = run_dir
        result = RunResult()
        outcome = "error"
        try:
            proc = self._popen(argv, cwd, subprocess.PIPE, _child_rlimits(self.limits, cpu_seconds, nproc))
        except OSError as e:
            result.error = f"could not start the sandbox: {e}"
            return result
        try:
            channel = _Channel(proc.stdout.fileno(), proc.stderr.fileno(), self.limits.channel_mb << 20)
            outcome = channel.exchange(
                proc.stdin, spec_bytes, time.monotonic() + wall_timeout, on_record, result
            )
            result.timed_out = outcome == "deadline"
            result.stopped_early = outcome == "stopped"
            result.stderr = channel.stderr()
        finally:
            if proc.poll() is None and outcome != "eof":
                self._kill(proc)
            self._finish(proc, result)
            if run_dir is not None:
                if self.uid is not None:
                    kill_uid_processes(self.uid)  # no pid namespace in unsafe mode: sweep by uid
                shutil.rmtree(run_dir, ignore_errors=True)
        return result

    def _finish(self, proc: subprocess.Popen, result: RunResult | None = None) -> None:
        """Make sure nothing of the sandbox survives, then reap bwrap."""
        if not _wait_exit(proc, 2.0):
            self._kill(proc)
        status = proc.wait()
        if result is not None:
            result.exit_status = status
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass

    def _kill(self, proc: subprocess.Popen) -> None:
        # Kill the sandbox's pid 1 first (the kernel then kills its whole pid namespace) so that bwrap, still
        # alive, reaps it; then bwrap and its process group. All of these are processes this object started.
        for child in _children_of(proc.pid):
            try:
                os.kill(child, signal.SIGKILL)
            except OSError:
                pass
        if not _wait_exit(proc, 0.5):
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the group start_new_session made for bwrap
            except OSError:
                pass
            proc.kill()

    # -- one sandbox for many programs (root's dedicated uids, the userns-nproc mechanism) -----------------

    def _start_zygote(self) -> _Zygote:
        """bwrap with the driver in serve mode as its pid 1, a control socket as its stdin. No RLIMIT_CPU here
        (the zygote lives on; each program's driver gets its own), and, not root, no launch cap: the zygote
        lowers RLIMIT_NPROC inside the sandbox's user namespace, where the kernel counts the sandbox alone."""
        budgets = self._budgets()
        argv = self._bwrap_argv("serve")
        argv += [str(budgets["memory_kb"]), str(budgets["max_tasks"]), str(budgets["nproc"])]
        nproc = budgets["max_tasks"] + 1 if self.uid is not None else None  # + bwrap's own process
        host, inside = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            proc = self._popen(argv, "/", inside.fileno(), _child_rlimits(self.limits, None, nproc))
        except BaseException:
            host.close()
            raise
        finally:
            inside.close()
        return _Zygote(proc, host, _Channel(proc.stdout.fileno(), proc.stderr.fileno(), 0))

    def _stop_zygote(self) -> None:
        zygote, self._zygote = self._zygote, None
        if zygote is not None:
            zygote.control.close()  # the zygote exits when its socket closes; _finish kills it if it does not
            self._finish(zygote.proc)

    def _kill_zygote(self) -> None:
        zygote, self._zygote = self._zygote, None
        if zygote is not None:
            zygote.control.close()
            self._kill(zygote.proc)
            self._finish(zygote.proc)

    def _run_in_zygote(
        self, style: str, spec_bytes: bytes, wall_timeout: float, on_record: Callable[[dict], bool] | None
    ) -> RunResult:
        result = self._run_in_zygote_once(style, spec_bytes, wall_timeout, on_record)
        if result.error == SANDBOX_GONE and not result.records:
            # It died between programs (a killed bwrap, say), before this one started: once more, in a new one.
            result = self._run_in_zygote_once(style, spec_bytes, wall_timeout, on_record)
        return result

    def _run_in_zygote_once(
        self, style: str, spec_bytes: bytes, wall_timeout: float, on_record: Callable[[dict], bool] | None
    ) -> RunResult:
        result = RunResult()
        if self._zygote is not None and self._zygote.proc.poll() is not None:
            self._kill_zygote()
        if self._zygote is None:
            try:
                self._zygote = self._start_zygote()
            except OSError as e:
                result.error = f"could not start the sandbox: {e}"
                return result
        zygote = self._zygote
        run_id = self.runs
        request = {
            "op": "run",
            "id": run_id,
            "style": style,
            "wall": wall_timeout,
            "cpu_seconds": int(wall_timeout) + 1,
        }
        spec_read, spec_write = os.pipe()
        try:
            socket.send_fds(zygote.control, [marshal.dumps(request, 4)], [spec_read])
        except OSError:
            os.close(spec_write)
            result.error = SANDBOX_GONE
            self._kill_zygote()
            return result
        finally:
            os.close(spec_read)
        channel = zygote.channel
        channel.cap = self.limits.channel_mb << 20
        deadline = time.monotonic() + wall_timeout
        spec_pipe = os.fdopen(spec_write, "wb", buffering=0)
        # The zygote ends the run itself at wall_timeout; END_GRACE later it is taken for unresponsive.
        outcome = channel.exchange(spec_pipe, spec_bytes, deadline + END_GRACE, on_record, result)
        if outcome == "stopped":
            result.stopped_early = True
            try:  # the zygote kills the program's processes and answers with its end record
                zygote.control.send(marshal.dumps({"op": "stop", "id": run_id}, 4))
                outcome = channel.exchange(None, b"", time.monotonic() + END_GRACE, None, result, keep=False)
            except OSError:
                outcome = "eof"
        end = channel.end if outcome == "end" else None
        result.stderr = channel.stderr()
        if end is None or end.get("id") != run_id:
            # Unresponsive, dead or garbling: this sandbox is replaced, and its program's processes die with it.
            result.timed_out = outcome == "deadline"
            if outcome == "eof" and not result.error:
                result.error = SANDBOX_GONE
            self._kill_zygote()
            return result
        result.exit_status = int(end.get("exit", 1))
        if end.get("why") == "timeout":
            result.timed_out = True
        elif end.get("why") and not result.stopped_early:
            result.ended = str(end["why"])
        if not end.get("clean") or self.runs % RECYCLE_RUNS == 0:
            self._stop_zygote()  # a fresh sandbox for the next program
        return result


class _Zygote:
    """A running persistent sandbox: bwrap, its pid 1 (the driver in serve mode), the control socket."""

    def __init__(self, proc: subprocess.Popen, control: socket.socket, channel: _Channel) -> None:
        self.proc, self.control, self.channel = proc, control, channel


class _Channel:
    """The host's end of a sandbox's result channel (JSON lines on its stdout) and of its stderr."""

    def __init__(self, out_fd: int, err_fd: int, cap: int) -> None:
        self.out_fd, self.err_fd, self.cap = out_fd, err_fd, cap
        self.err_open = True
        self.end: dict | None = None  # a persistent sandbox's end-of-run record
        self._buf = bytearray()
        self._received = 0
        self._err: list[bytes] = []
        self._err_len = 0

    def stderr(self) -> str:
        text = b"".join(self._err)[:65536].decode("utf-8", errors="replace")
        self._err, self._err_len = [], 0
        return text

    def exchange(
        self,
        spec_pipe,
        spec: bytes,
        deadline: float,
        on_record: Callable[[dict], bool] | None,
        result: RunResult,
        keep: bool = True,
    ) -> str:
        """Write spec into spec_pipe (then close it) while reading records until the driver closes the channel
        ("eof"), a persistent sandbox's end record arrives ("end"), on_record says stop ("stopped"), the
        deadline passes ("deadline") or the data is bad ("error", result.error says why). With keep=False
        (draining after a stop) records are dropped."""
        if keep:
            self.end, self._received = None, 0
        sel = selectors.DefaultSelector()
        sel.register(self.out_fd, selectors.EVENT_READ)
        if self.err_open:
            sel.register(self.err_fd, selectors.EVENT_READ)
        pending = memoryview(spec)
        in_fd = -1
        if spec_pipe is not None:
            in_fd = spec_pipe.fileno()
            os.set_blocking(in_fd, False)
            sel.register(in_fd, selectors.EVENT_WRITE)
        try:
            outcome = self._parse(on_record, result, keep)  # lines a previous exchange left unread
            if outcome:
                return outcome
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return "deadline"
                for key, _ in sel.select(left):
                    fd = key.fd
                    if fd == in_fd:
                        try:
                            pending = pending[os.write(in_fd, pending[: 1 << 16]) :]
                        except BlockingIOError:
                            continue
                        except OSError:  # the driver died before reading its spec
                            pending = pending[:0]
                        if not pending:
                            sel.unregister(in_fd)
                            spec_pipe.close()
                            in_fd = -1
                        continue
                    data = os.read(fd, 1 << 20)
                    if fd == self.err_fd:
                        if not data:
                            sel.unregister(self.err_fd)
                            self.err_open = False
                        elif self._err_len < 65536:
                            self._err.append(data)
                            self._err_len += len(data)
                        continue
                    if not data:
                        return "eof"  # the driver closed its channel: it exited (or was killed)
                    self._received += len(data)
                    if self.cap and self._received > self.cap:
                        result.error = "the program's results exceeded the output cap"
                        return "error"
                    self._buf += data
                    outcome = self._parse(on_record, result, keep)
                    if outcome:
                        return outcome
        finally:
            sel.close()
            if in_fd >= 0:
                spec_pipe.close()

    def _parse(self, on_record: Callable[[dict], bool] | None, result: RunResult, keep: bool) -> str:
        """Handle the complete lines in the buffer: "" when all were taken, else the exchange's outcome."""
        while (nl := self._buf.find(b"\n")) >= 0:
            line = bytes(self._buf[:nl])
            del self._buf[: nl + 1]
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("not an object")
            except ValueError:
                result.error = "unreadable result from the driver"
                return "error"
            if record.get("end") is True:
                self.end = record
                return "end" if not self._buf else "error"
            if not keep:
                continue
            result.records.append(record)
            if on_record is not None and not on_record(record):
                return "stopped"
        return ""


def probe_sandbox(sandbox: Sandbox) -> None:
    """Run a trivial program; raise SandboxUnavailable with bwrap's own words if the sandbox cannot start."""
    res = sandbox.run("stdin", "print(6 * 7)", {"timeout": 10, "cpu_seconds": 10, "inputs": [""]}, 20.0)
    if not (res.records and res.records[0].get("ok") and res.records[0].get("out", "").strip() == "42"):
        raise SandboxUnavailable(
            f"the sandbox could not run a trivial program (records={res.records!r}, exit={res.exit_status}, "
            f"stderr={res.stderr.strip()[-800:]!r})"
        )
