"""What every benchmark says about the machine it ran on (stdlib only; torch is imported when asked about)."""

from __future__ import annotations

import os
import platform


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask), not all the machine has."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no sched_getaffinity on this OS
        return os.cpu_count() or 1


def load_average() -> float:
    """The 1-minute load average: other jobs on a small machine skew timings, so benchmarks report it."""
    return round(os.getloadavg()[0], 2)


def describe_device() -> str:
    """CPU, usable cores, OS, torch version and intra-op threads; plus the GPU when there is one."""
    import torch

    text = (
        f"{cpu_name()}, {usable_cores()} cores, {platform.system()} {platform.release()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    if torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name()}"
    return text


def announce_device() -> tuple[str, float]:
    """Print a benchmark's first line, `device: ...; load average ...`; return the description and load."""
    device, load = describe_device(), load_average()
    print(f"device: {device}; load average {load:.2f}", flush=True)
    return device, load


def proportional_set_size(pid: int) -> int:
    """Bytes of memory process `pid` holds, pages shared with other processes split between them (Pss): a
    shared-memory buffer mapped by two processes counts once in their sum, not twice as in RSS."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/{pid}/smaps_rollup has no Pss line")


# glibc settings under which a process's resident set follows what is live: every allocation of 64 KiB or more
# gets its own mmap (so a freed tensor leaves the resident set at once instead of staying in the heap), no
# trimming slack, one arena. Read by glibc at process start: put them in a child process's environment.
MALLOC_RETURNS_FREED_MEMORY = {
    "MALLOC_MMAP_THRESHOLD_": "65536",
    "MALLOC_TRIM_THRESHOLD_": "0",
    "MALLOC_TOP_PAD_": "0",
    "MALLOC_ARENA_MAX": "1",
}


def status_bytes(field: str, pid: int | str = "self") -> int:
    """A memory line of /proc/PID/status in bytes: VmRSS (resident now) or VmHWM (its high-water mark)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/{pid}/status has no {field} line")


def reset_peak_resident(pid: int | str = "self") -> None:
    """Reset the kernel's high-water mark of the resident set (VmHWM) of process `pid` to its current size."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


class PeakMemory:
    """The peak, above the level at entry, of the summed Pss of some processes while the block runs, sampled
    from a thread every `interval_s` (a peak shorter than that can be missed)."""

    def __init__(self, pids: list[int], interval_s: float = 0.002):
        self.pids, self.interval_s = pids, interval_s
        self.before = self.peak = 0

    def total(self) -> int:
        return sum(proportional_set_size(pid) for pid in self.pids)

    def _sample(self) -> None:
        import time

        while not self._stop.is_set():
            self.peak = max(self.peak, self.total())
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakMemory:
        import threading

        self.before = self.peak = self.total()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="mrl-peak-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.total())

    @property
    def extra(self) -> int:
        return self.peak - self.before
