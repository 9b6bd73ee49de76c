"""The test driver that runs INSIDE the sandbox (stdlib only; the system python runs it as its pid 1).

    python3 -I -B sandbox_driver.py STYLE HARNESS_DIR IO_DIR
    python3 -I -B sandbox_driver.py serve HARNESS_DIR IO_DIR MEMORY_KB MAX_TASKS NPROC

STYLE is "stdin", "functional" or "check": one program, then exit. "serve" makes this process the zygote of a
persistent sandbox, which forks a driver per program (see serve() below); each driver does what the first
form does. HARNESS_DIR (read-only) holds program.py, the untrusted solution.
The spec arrives on stdin (the first form) or on the program's own pipe (serve) as two frames (8-byte little-endian length + marshal v4 dict): the public part
(timeout, inputs, fn_name, entry_point, prelude), then the secret part (the check code). Results leave on
stdout as JSON lines:
    {"i": k, "ok": true, "out": "..."}      stdin test k ran; "out" is its stdout, judged outside the sandbox
    {"i": k, "ok": true, "ret": "<repr>"}   functional test k returned; "ret" is repr(value), judged outside
    {"i": k, "ok": false, "why": "..."}     test k crashed, timed out or could not be serialised
    {"check": true | false, "why": "..."}   check style: the trusted check() returned (or raised)
    {"done": true}

Trust: the driver never runs untrusted code itself. The solution runs only in forked children that first close
the channel and the spec pipe and point fds 0-2 elsewhere. The driver (or the zygote it was forked from) makes
itself non-dumpable, so those children (same uid, no capabilities) can neither ptrace it nor open its
/proc/<pid>/fd/* or mem; as pid 1 of a pid namespace it also ignores their signals (a driver forked by the
zygote does not: a program that kills it ends its own run). It supervises the namespace: past the spec's
memory_kb of resident memory or max_tasks tasks in all, it kills every other process; with nproc it first
lowers its own RLIMIT_NPROC (counted in the sandbox's user namespace on kernels that do so, see
confinement.py). Expected outputs of stdin and functional tests never enter the sandbox, so no child can
learn them. For the check style (HumanEval-like `check(candidate)` code, which holds
the expected values) the call server is forked BEFORE the secret frame is read: its memory never held the
test code.
The check runs here against a proxy whose calls cross a pipe as Python literals (repr -> ast.literal_eval),
so the solution can neither see the checks nor hand back an object that claims to equal everything.
"""

# Imports are kept to modules that load fast (no json/re/enum/signal): their load time is paid on every run.
import _json
import _signal
import builtins
import io
import marshal
import os
import select
import sys
import time

SIGKILL = 9
SIGNAL_NAMES = {
    4: "SIGILL",
    6: "SIGABRT",
    7: "SIGBUS",
    8: "SIGFPE",
    9: "SIGKILL",
    11: "SIGSEGV",
    13: "SIGPIPE",
}
SIGNAL_NAMES.update({15: "SIGTERM", 24: "SIGXCPU", 25: "SIGXFSZ", 31: "SIGSYS"})
READ_CHUNK = 1 << 20
WATCH_INTERVAL = 0.02  # seconds between checks of the sandbox's total memory and tasks
# The zygote's own checks, a backstop for a driver the program stopped (SIGSTOP): less often, so that the
# driver, which can say which test went over, normally sees it first.
BACKSTOP_WATCH_INTERVAL = 0.05
MEMORY_BUDGET_KB = [0]  # total resident memory allowed to the whole sandbox; 0: no watch (set from the spec)
MAX_TASKS = [0]  # tasks (processes and threads) allowed to the whole sandbox, driver included; 0: no watch
MAX_REPLY = 64 << 20  # a call result larger than this is a failure, not something to buffer
# True when this process tree has a pid namespace of its own (the driver or the zygote is its pid 1): only then
# may it kill every process it can see. Unsafe mode shares the host's namespace. Forked drivers inherit it.
OWN_PID_NAMESPACE = [False]


def _make_undumpable() -> None:
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 4
    except Exception:
        pass  # unsafe mode on an exotic libc; inside bwrap on Linux this always works


def _json_line(record: dict) -> bytes:
    """A JSON object line for the channel: keys are str; values str, int, bool or None. No json module."""
    parts = []
    for key, value in record.items():
        if isinstance(value, str):
            text = _json.encode_basestring_ascii(value)
        elif value is True or value is False:
            text = "true" if value else "false"
        elif value is None:
            text = "null"
        else:
            text = str(int(value))
        parts.append(f'"{key}": {text}')
    return ("{" + ", ".join(parts) + "}\n").encode("ascii")


def _redirect_fds(stdin_fd: int, stdout_fd: int, stderr_fd: int, keep: tuple = ()) -> None:
    """In a freshly forked child: fds 0-2 from the given fds, every other inherited fd closed except keep."""
    os.dup2(stdin_fd, 0)
    os.dup2(stdout_fd, 1)
    os.dup2(stderr_fd, 2)
    try:
        hi = min(os.sysconf("SC_OPEN_MAX"), 1 << 16)
    except (ValueError, OSError):
        hi = 4096
    lo = 3
    for fd in sorted(k for k in keep if k >= 3):
        os.closerange(lo, fd)
        lo = fd + 1
    os.closerange(lo, hi)


def _fresh_std_streams() -> None:
    """New sys.std* objects over fds 0-2 (the inherited ones may hold buffered state of the driver's fds)."""
    sys.stdin = sys.__stdin__ = io.TextIOWrapper(
        io.BufferedReader(io.FileIO(0, "r", closefd=False)), encoding="utf-8", errors="surrogateescape"
    )
    sys.stdout = sys.__stdout__ = io.TextIOWrapper(
        io.BufferedWriter(io.FileIO(1, "w", closefd=False)), encoding="utf-8", errors="surrogateescape"
    )
    sys.stderr = sys.__stderr__ = io.TextIOWrapper(
        io.BufferedWriter(io.FileIO(2, "w", closefd=False)),
        encoding="utf-8",
        errors="backslashreplace",
        line_buffering=True,
    )


def _join_threads() -> None:
    # A normal interpreter waits for non-daemon threads at exit (solutions often run main() in a thread with a
    # bigger stack); os._exit would not. No threads can exist unless the solution imported threading.
    threading = sys.modules.get("threading")
    if threading is None:
        return
    for t in threading.enumerate():
        if t is not threading.main_thread() and not t.daemon:
            t.join()


def _flush_and_exit(status: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            status = status or 1
    os._exit(status)


def _run_module(code, name: str) -> int:
    """exec the solution as a module; the exit status a plain `python3 solution.py` would have had."""
    namespace = {"__name__": name, "__builtins__": builtins, "__file__": "solution.py"}
    try:
        exec(code, namespace)
        _join_threads()
        return 0
    except SystemExit as e:
        if e.code is None or e.code == 0:
            return 0
        if isinstance(e.code, int):
            return e.code & 0xFF or 1
        print(e.code, file=sys.stderr)
        return 1
    except BaseException:
        import traceback

        traceback.print_exc(limit=3)
        return 1


def _shm_segments_kb() -> int:
    """Resident KiB of the System V shared memory segments of the sandbox's IPC namespace: a segment keeps its
    memory after every process detached it, where no process's RSS shows it."""
    try:
        with open("/proc/sysvipc/shm", "rb") as f:
            rows = f.read().splitlines()[1:]
    except OSError:
        return 0
    total = 0
    for row in rows:
        fields = row.split()
        if len(fields) > 14:
            total += int(fields[14])  # rss, bytes
    return total // 1024


def _sandbox_usage() -> tuple:
    """(resident KiB, tasks) of every process in the sandbox (its own pid namespace: /proc lists only those),
    System V shared memory included."""
    pages = tasks = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
                tasks += int(fields[17])  # num_threads (field 20)
                pages += int(fields[21])  # rss (field 24)
            except (OSError, ValueError, IndexError):
                pass
    return pages * (os.sysconf("SC_PAGE_SIZE") // 1024) + _shm_segments_kb(), tasks


def _over_budget():
    """None, "memory" or "processes". RLIMIT_AS caps each process, but 30 processes of 1 GB each would still
    sink the host, and a non-root caller's RLIMIT_NPROC may count more than this sandbox: the driver, as pid 1,
    watches the totals, and kills every other process of the sandbox when one is exceeded."""
    if not (MEMORY_BUDGET_KB[0] or MAX_TASKS[0]) or not OWN_PID_NAMESPACE[0]:
        return None
    rss_kb, tasks = _sandbox_usage()
    if MAX_TASKS[0] and tasks > MAX_TASKS[0]:
        over = "processes"
    elif MEMORY_BUDGET_KB[0] and rss_kb > MEMORY_BUDGET_KB[0]:
        over = "memory"
    else:
        return None
    _clear_namespace()
    return over


OVER_WHY = {"memory": "memory limit exceeded", "processes": "process limit exceeded"}


def _wait_child(pid: int, timeout: float) -> tuple:
    """Wait for a child under a wall-clock limit: (wait status, None | "timeout" | "memory" | "processes")."""
    deadline = time.monotonic() + timeout
    pidfd = None
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pass
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return status, False
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, SIGKILL)
                return _reap_killed(pid), "timeout"
            if pidfd is not None:
                select.select([pidfd], [], [], min(left, WATCH_INTERVAL))
            else:
                time.sleep(min(left, 0.005))
            over = _over_budget()
            if over:
                return _reap_killed(pid), over
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _reap_killed(pid: int) -> int:
    """The wait status of a child just SIGKILLed; _clear_namespace may have reaped it already."""
    try:
        return os.waitpid(pid, 0)[1]
    except ChildProcessError:
        return SIGKILL  # the status of a process killed by SIGKILL


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return f"killed by {SIGNAL_NAMES.get(sig, f'signal {sig}')}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"


def _tail(path: str, limit: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - limit))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _clear_namespace() -> bool:
    """In the sandbox's own pid namespace: kill every process but pid 1 and this one (daemons a test left
    behind) and reap the zombies. Repeats while processes remain: a fork bomb may fork between the listing and
    the kill. As pid 1 it also waits for the zombies, which all become its children; True when nothing but
    pid 1 and this process is left."""
    if not OWN_PID_NAMESPACE[0]:
        return True  # unsafe mode shares the host's pid namespace: never signal what we did not fork
    keep = {1, os.getpid()}
    for _ in range(1000):
        living = zombies = 0
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) in keep:
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    state = f.read().rsplit(b")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if state == b"Z":
                zombies += 1
                continue
            living += 1
            try:
                os.kill(int(entry), SIGKILL)
            except OSError:
                pass
        _reap()
        if not living and (not zombies or os.getpid() != 1):
            return True
        time.sleep(0.001)
    return False


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


class Channel:
    """The driver's private duplicate of the stdout pipe; fd 1 itself is pointed at /dev/null."""

    def __init__(self) -> None:
        self.fd = os.dup(1)
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 1)
        os.close(devnull)

    def send(self, **record) -> None:
        view = memoryview(_json_line(record))
        while view:
            view = view[os.write(self.fd, view) :]


# --------------------------------------------------------------------------------------------------
# stdin/stdout tests: one forked child per test, fed the test's input file on fd 0.


def run_stdin_tests(code, tests: list, timeout: float, cpu_seconds: int, iodir: str, chan: Channel) -> None:
    import resource

    in_path, out_path, err_path = (os.path.join(iodir, n) for n in ("input.txt", "output.txt", "stderr.txt"))
    hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    cpu = cpu_seconds if hard == resource.RLIM_INFINITY else min(cpu_seconds, hard)
    for i, test in enumerate(tests):
        with open(in_path, "wb") as f:
            f.write(test.encode("utf-8", errors="surrogateescape"))
        in_fd = os.open(in_path, os.O_RDONLY)
        out_fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        err_fd = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        pid = os.fork()
        if pid == 0:  # child: becomes the solution
            status = 1
            try:
                _redirect_fds(in_fd, out_fd, err_fd)
                resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))  # a fresh CPU budget per test
                _fresh_std_streams()
                sys.argv = ["solution.py"]
                status = _run_module(code, "__main__")
            finally:
                _flush_and_exit(status)
        for fd in (in_fd, out_fd, err_fd):
            os.close(fd)
        status, over = _wait_child(pid, timeout)
        _clear_namespace()
        if over == "timeout":
            chan.send(i=i, ok=False, why="timeout")
            return
        if over:
            chan.send(i=i, ok=False, why=OVER_WHY[over])
            return
        if status != 0:
            chan.send(i=i, ok=False, why=_describe_status(status), stderr=_tail(err_path))
            return
        with open(out_path, "rb") as f:
            out = f.read().decode("utf-8", errors="replace")
        chan.send(i=i, ok=True, out=out)


# --------------------------------------------------------------------------------------------------
# function calls: one long-lived child (the call server) loads the solution once and answers calls over pipes.
# Request (driver -> server): 8-byte length + marshal'd (fn_name, args, kwargs): plain values, exact types.
# Reply (server -> driver): b"ok <n>\n" or b"err <n>\n", then n bytes of UTF-8: repr(result) or the error.
# The driver parses replies by hand and never unmarshals them: they come from untrusted code.


def _find_callable(namespace: dict, name: str):
    # LeetCode style: a method of class Solution on a fresh instance per call; otherwise a top-level function.
    cls = namespace.get("Solution")
    if isinstance(cls, type) and hasattr(cls, name):
        return getattr(cls(), name)
    fn = namespace.get(name)
    if callable(fn):
        return fn
    raise NameError(f"no function {name!r} (nor Solution.{name})")


def _serve_calls(program_path: str, req_fd: int, resp_fd: int) -> None:
    """Body of the call server. Runs untrusted code: everything it sends is data that the driver checks."""

    def reply(ok: bool, text: str) -> None:
        data = text.encode("utf-8", errors="surrogateescape")
        view = memoryview(b"%s %d\n" % (b"ok" if ok else b"err", len(data)) + data)
        while view:
            view = view[os.write(resp_fd, view) :]

    def read_exact(n: int) -> bytes:
        chunks = []
        while n:
            chunk = os.read(req_fd, n)
            if not chunk:
                raise EOFError
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    try:
        with open(program_path, encoding="utf-8", errors="surrogateescape") as f:
            source = f.read()
        namespace = {"__name__": "solution", "__builtins__": builtins, "__file__": "solution.py"}
        exec(compile(source, "solution.py", "exec"), namespace)
    except BaseException as e:
        reply(False, f"loading the solution failed: {type(e).__name__}: {e}"[:500])
        return
    reply(True, "")
    while True:
        try:
            fn_name, args, kwargs = marshal.loads(read_exact(int.from_bytes(read_exact(8), "little")))
        except EOFError:
            return
        try:
            result = repr(_find_callable(namespace, fn_name)(*args, **kwargs))
            sys.stdout.flush()
            reply(True, result)
        except BaseException as e:
            reply(False, f"{type(e).__name__}: {e}"[:500])


class CallServer:
    def __init__(self, program_path: str, iodir: str) -> None:
        req_r, self.req_w = os.pipe()
        self.resp_r, resp_w = os.pipe()
        devnull = os.open(os.devnull, os.O_RDWR)
        err_fd = os.open(
            os.path.join(iodir, "calls-stderr.txt"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600
        )
        self.pid = os.fork()
        if self.pid == 0:
            status = 1
            try:
                _redirect_fds(devnull, devnull, err_fd, keep=(req_r, resp_w))
                _fresh_std_streams()
                sys.argv = ["solution.py"]
                _serve_calls(program_path, req_r, resp_w)
                status = 0
            finally:
                _flush_and_exit(status)
        for fd in (req_r, resp_w, devnull, err_fd):
            os.close(fd)
        self.buffer = b""
        self.alive = True
        self.watched = time.monotonic()  # when the sandbox's memory and tasks were last checked

    def _fill(self, deadline: float, need) -> None:
        """Read from the server until need(buffer) holds; kill it and raise on timeout, death or excess."""
        while not need(self.buffer):
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise TimeoutError("timeout")
            ready = select.select([self.resp_r], [], [], min(left, WATCH_INTERVAL))[0]
            now = time.monotonic()
            if not ready or now - self.watched >= WATCH_INTERVAL:  # also while replies keep coming
                self.watched = now
                over = _over_budget()
                if over:
                    self.kill()
                    raise (MemoryError if over == "memory" else RuntimeError)(OVER_WHY[over])
            if not ready:
                continue
            chunk = os.read(self.resp_r, READ_CHUNK)
            if not chunk:
                self.kill()
                raise RuntimeError("the solution process died")
            self.buffer += chunk
            if len(self.buffer) > MAX_REPLY + 64:
                self.kill()
                raise RuntimeError("result too large")

    def _read_reply(self, timeout: float) -> tuple:
        deadline = time.monotonic() + timeout
        self._fill(deadline, lambda b: b"\n" in b[:64] or len(b) > 64)
        header, sep, rest = self.buffer.partition(b"\n")
        fields = header.split(b" ")
        if not sep or len(fields) != 2 or fields[0] not in (b"ok", b"err") or not fields[1].isdigit():
            self.kill()
            raise RuntimeError("garbled reply from the solution process")
        n = int(fields[1])
        if n > MAX_REPLY:
            self.kill()
            raise RuntimeError("result too large")
        self.buffer = rest
        self._fill(deadline, lambda b: len(b) >= n)
        text, self.buffer = self.buffer[:n].decode("utf-8", errors="replace"), self.buffer[n:]
        return fields[0] == b"ok", text

    def wait_ready(self, timeout: float) -> None:
        ok, text = self._read_reply(timeout)
        if not ok:
            raise RuntimeError(text)

    def call(self, fn: str, args: list, kwargs: dict, timeout: float) -> tuple:
        """(ok, text): repr of the call's result, or the error it raised."""
        if not self.alive:
            raise RuntimeError("the solution process died")
        payload = marshal.dumps((fn, args, kwargs), 4)  # ValueError for anything but plain values
        data = memoryview(len(payload).to_bytes(8, "little") + payload)
        deadline = time.monotonic() + timeout
        try:
            while data:
                if not select.select([], [self.req_w], [], max(0.0, deadline - time.monotonic()))[1]:
                    self.kill()
                    raise TimeoutError("timeout")
                data = data[os.write(self.req_w, data[:65536]) :]
        except BrokenPipeError:
            self.kill()
            raise RuntimeError("the solution process died") from None
        return self._read_reply(max(0.0, deadline - time.monotonic()))

    def kill(self) -> None:
        if self.alive:
            self.alive = False
            try:
                os.kill(self.pid, SIGKILL)
            except OSError:
                pass
            try:
                os.waitpid(self.pid, 0)
            except ChildProcessError:
                pass


def run_functional_tests(
    server: CallServer, fn_name: str, tests: list, timeout: float, chan: Channel
) -> None:
    try:
        server.wait_ready(timeout)
    except Exception as e:
        chan.send(i=0, ok=False, why=str(e)[:500])
        return
    for i, test in enumerate(tests):
        try:
            ok, text = server.call(fn_name, test, {}, timeout)
        except Exception as e:
            chan.send(i=i, ok=False, why=str(e)[:500])
            return
        if not ok:
            chan.send(i=i, ok=False, why=text[:500])
            return
        chan.send(i=i, ok=True, ret=text)


def run_check(server: CallServer, namespace: dict, public: dict, secret: dict, chan: Channel) -> None:
    """HumanEval style: trusted test code here, in the namespace of the (already run) trusted prelude; the
    candidate is a proxy to the call server. Values cross as plain data: marshal out, repr -> literal back."""
    import ast

    timeout = float(public["timeout"])
    deadline = time.monotonic() + timeout
    entry_point = public["entry_point"]

    def candidate(*args, **kwargs):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("timeout")
        ok, reply = server.call(entry_point, list(args), kwargs, left)
        if not ok:
            raise RuntimeError(f"the solution raised {reply}")
        return ast.literal_eval(reply)

    try:
        if "__prelude_error__" in namespace:
            raise namespace["__prelude_error__"]
        server.wait_ready(timeout)
        namespace[entry_point] = candidate  # a check may call the function by name, not only as candidate
        exec(compile(secret["test"], "test.py", "exec"), namespace)
        namespace[public.get("check_fn", "check")](candidate)
    except BaseException as e:
        chan.send(check=False, why=f"{type(e).__name__}: {e}"[:500])
        return
    chan.send(check=True)


def _read_exact(fd: int, n: int) -> bytes:
    chunks = []
    while n:
        chunk = os.read(fd, min(n, READ_CHUNK))
        if not chunk:
            raise EOFError("the spec was cut short")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _read_frame() -> dict:
    return marshal.loads(_read_exact(0, int.from_bytes(_read_exact(0, 8), "little")))


def _run_prelude(source: str) -> dict:
    """Check style: run the trusted prelude (HumanEval: the prompt) before the call server is forked, so its
    imports (typing, math, ...) are loaded once for both processes."""
    import ast  # noqa: F401  (loaded here once: run_check needs it)

    namespace = {"__name__": "__check__", "__builtins__": builtins}
    try:
        exec(compile(source, "prelude.py", "exec"), namespace)
    except BaseException as e:
        namespace["__prelude_error__"] = e
    return namespace


def run_program(style: str, harness: str, iodir: str, chan: Channel) -> None:
    """One program's tests: the spec's two frames on fd 0, the results on chan, then {"done": true}."""
    program_path = os.path.join(harness, "program.py")
    public = _read_frame()
    MEMORY_BUDGET_KB[0] = int(public.get("memory_kb", 0))
    MAX_TASKS[0] = int(public.get("max_tasks", 0))
    if public.get("nproc"):  # before anything is forked: every process of the sandbox inherits it
        _lower_nproc(int(public["nproc"]))
    namespace = _run_prelude(public.get("prelude", "")) if style == "check" else None
    # Fork the call server before the secret frame (check code and its expected values) is read.
    server = CallServer(program_path, iodir) if style in ("functional", "check") else None
    secret = _read_frame()
    os.close(0)
    timeout = float(public["timeout"])
    spec = public
    if style == "stdin":
        try:
            with open(program_path, encoding="utf-8", errors="surrogateescape") as f:
                code = compile(f.read(), "solution.py", "exec")
        except BaseException as e:
            chan.send(i=0, ok=False, why=f"does not compile: {type(e).__name__}: {e}"[:500])
        else:
            run_stdin_tests(code, spec["inputs"], timeout, int(spec["cpu_seconds"]), iodir, chan)
    elif style == "functional":
        run_functional_tests(server, spec["fn_name"], spec["inputs"], timeout, chan)
    elif style == "check":
        run_check(server, namespace, public, secret, chan)
    if server is not None:
        server.kill()
    chan.send(done=True)


def _lower_nproc(n: int) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_NPROC, (n, n))


# --------------------------------------------------------------------------------------------------
# serve: the zygote. The sandbox stays up for many programs; this process (its pid 1) forks one driver per
# program, supervises it, then leaves the sandbox as it found it: every other process killed, the scratch
# dirs emptied, System V IPC objects removed. Control messages arrive on fd 0, a unix SOCK_SEQPACKET socket:
# marshal'd dicts {"op": "run", "id", "style", "wall", "cpu_seconds"} carrying the read end of a pipe with the
# program's two spec frames (so the zygote never reads the secret frame: drivers forked later cannot hold it),
# and {"op": "stop", "id"} to end a run early. After each run it sends {"end": true, "id", "exit", "why",
# "clean"} on the channel; "clean": false asks the host for a fresh sandbox.

SCRATCH_DIRS = (
    ("/tmp", 0o1777),
    ("/sandbox", 0o700),
    ("/dev/shm", 0o1777),
)  # the writable mounts (sandbox.py)


def _empty_dir(path: str) -> bool:
    ok = True
    with os.scandir(path) as it:
        entries = list(it)
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False):
                os.chmod(entry.path, 0o700)  # a program may have left it unreadable
                ok = _empty_dir(entry.path) and ok
                os.rmdir(entry.path)
            else:
                os.unlink(entry.path)
        except OSError:
            ok = False
    return ok


def _remove_ipc_objects() -> bool:
    """Remove the System V shared memory segments, semaphore sets and message queues a program left."""
    ok = True
    libc = None
    for kind in ("shm", "sem", "msg"):
        try:
            with open(f"/proc/sysvipc/{kind}", "rb") as f:
                ids = [int(row.split()[1]) for row in f.read().splitlines()[1:] if row.strip()]
        except (OSError, ValueError, IndexError):
            ok = False
            continue
        if not ids:
            continue
        if libc is None:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
        for ipc_id in ids:  # IPC_RMID = 0
            if kind == "shm":
                rc = libc.shmctl(ipc_id, 0, None)
            elif kind == "sem":
                rc = libc.semctl(ipc_id, 0, 0)
            else:
                rc = libc.msgctl(ipc_id, 0, None)
            ok = ok and rc == 0
    return ok


def _wipe() -> bool:
    """After a run, with every other process gone: the scratch dirs empty and as created, no IPC objects."""
    ok = _remove_ipc_objects()
    for path, mode in SCRATCH_DIRS:
        try:
            os.chmod(path, mode)
            ok = _empty_dir(path) and ok
        except BaseException:  # RecursionError on an absurdly deep tree, among others
            ok = False
    return ok


def _supervise(pid: int, wall: float, control, run_id: int) -> str:
    """Wait for the driver child under the wall-clock limit, watching the sandbox's memory and tasks (a
    program can stop its driver with SIGSTOP, but not pid 1) and the control socket for a stop.
    Returns "" when the child exited by itself, else why it was ended."""
    deadline = time.monotonic() + wall
    pidfd = os.pidfd_open(pid)
    why = ""
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                why = "timeout"
                break
            ready = select.select([pidfd, control], [], [], min(left, BACKSTOP_WATCH_INTERVAL))[0]
            if pidfd in ready:
                break
            if control in ready:
                data = control.recv(1 << 16)
                if not data:
                    why = "host gone"
                    break
                message = marshal.loads(data)
                if message.get("op") == "stop" and message.get("id") == run_id:
                    why = "stopped"
                    break
                continue
            over = _over_budget()
            if over:
                why = OVER_WHY[over]
                break
    finally:
        os.close(pidfd)
    if why:
        try:
            os.kill(pid, SIGKILL)
        except OSError:
            pass
    return why


def serve(harness: str, iodir: str, chan: Channel) -> None:
    import resource
    import socket

    control = socket.socket(fileno=0)
    while True:
        try:
            data, fds, _flags, _addr = socket.recv_fds(control, 1 << 16, 1)
        except OSError:
            return
        if not data:
            return  # the host closed the socket: the sandbox ends with us
        request = marshal.loads(data)
        if request.get("op") != "run" or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            continue  # a stop for a run that already ended
        run_id = int(request["id"])
        pid = os.fork()
        if pid == 0:  # the driver of this program: spec frames on fd 0, where the control socket was
            status = 1
            try:
                os.dup2(fds[0], 0)
                os.close(fds[0])
                cpu = int(request["cpu_seconds"])
                resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
                run_program(request["style"], harness, iodir, chan)
                status = 0
            finally:
                sys.stderr.flush()
                os._exit(status)
        os.close(fds[0])
        why = _supervise(pid, float(request["wall"]), control, run_id)
        status = _reap_killed(pid)
        if not why and os.WIFSIGNALED(status):  # no solution code runs in the driver: a process killed it
            sig = os.WTERMSIG(status)
            why = f"the program killed its driver ({SIGNAL_NAMES.get(sig, f'signal {sig}')})"
        clean = _clear_namespace() and _wipe()
        chan.send(end=True, id=run_id, exit=os.waitstatus_to_exitcode(status), why=why, clean=clean)
        if why == "host gone":
            return


def main() -> None:
    style, harness, iodir = sys.argv[1:4]
    _signal.signal(2, _signal.SIG_DFL)  # SIGINT: as pid 1, a signal with no handler cannot reach us
    OWN_PID_NAMESPACE[0] = os.getpid() == 1
    chan = Channel()
    _make_undumpable()
    if style == "serve":  # argv: serve HARNESS IODIR MEMORY_KB MAX_TASKS NPROC
        MEMORY_BUDGET_KB[0], MAX_TASKS[0], nproc = (int(x) for x in sys.argv[4:7])
        if nproc:
            _lower_nproc(nproc)
        serve(harness, iodir, chan)
    else:
        run_program(style, harness, iodir, chan)


if __name__ == "__main__":
    main()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown: a few ms per run, and nothing is left to clean up
