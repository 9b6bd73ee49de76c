"""Reward benchmark: `megatron-rl bench rewards` / `python -m megatron_rl.bench.rewards`.

Code: the 164 HumanEval canonical solutions, sandboxed (bubblewrap) against the same programs run as plain
`python3 script.py` with no sandbox, in the same run:
- one program at a time, each problem run three ways back to back (plain, in the worker's persistent sandbox,
  and in a sandbox started for the program alone, the order rotating): the median of the paired wall-clock
  differences is the sandbox's overhead per program, robust to other load; CPU time is the mean per program
  of every process involved (this one included: it starts the plain python3 and talks to the sandbox; bwrap,
  the zygote, the driver, the program), summed over the whole pass because the kernel counts the CPU time
  of processes that live on (the persistent sandbox) in 10 ms ticks;
- throughput with `--workers` workers: a RewardPool against a thread pool of as many plain subprocesses,
  programs/s (wall clock) and CPU time per program (the pool's workers included).
Math: a mixed set in GRPO-like groups of 8 samples per reference (fractions, radicals, intervals, sets,
percentages, polynomials, integers; 4 right answers in two spellings, 3 wrong, 1 without a box), scored after
a warm-up on a disjoint set (the trainer's workers live for the whole run): samples/s on one core in process,
and through a RewardPool, per wall-clock second and per CPU second.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

from megatron_rl.bench.common import cpu_name, usable_cores
from megatron_rl.rewards import humaneval as he
from megatron_rl.rewards import math_grader as mr
from megatron_rl.rewards.code_reward import run_check_tests
from megatron_rl.rewards.pool import RewardPool
from megatron_rl.rewards.sandbox import SANDBOX_PYTHON, Sandbox, UidLease, is_root


def machine() -> str:
    return f"{usable_cores()} cores ({cpu_name()}), Linux {platform.release()}"


def _children_of(pid: int) -> list[int]:
    children = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                children += [int(c) for c in f.read().split()]
    except (OSError, ValueError):
        pass
    return children


def _tree_cpu(pids: list[int]) -> float:
    """CPU seconds of processes, of their waited-for descendants (utime+stime+cutime+cstime) and of their
    live descendants (a persistent sandbox lives as long as its worker)."""
    ticks = 0
    todo = list(pids)
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += sum(int(x) for x in fields[11:15])
        todo += _children_of(pid)
    return ticks / os.sysconf("SC_CLK_TCK")


def _cpu_now() -> float:
    """CPU seconds of this process, its waited-for children and its live descendants."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + ru.ru_utime + ru.ru_stime + _tree_cpu(_children_of(os.getpid()))


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _run_plain(path: str, timeout: float) -> bool:
    try:
        proc = subprocess.run([SANDBOX_PYTHON, path], capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False
    return proc.returncode == 0


def _median_ms(xs: list[float]) -> float:
    return 1000 * statistics.median(xs)


# -- code ---------------------------------------------------------------------------------------------------


def bench_code(workers: int, repeats: int, timeout: float = 10.0) -> dict:
    problems = he.load_problems()
    n = len(problems)
    programs = [he.program(p) for p in problems]
    tests = [he.tests(p) for p in problems]
    tmp = tempfile.mkdtemp(prefix="megatron-rl-bench-")
    scripts = []
    for i, p in enumerate(problems):
        path = os.path.join(tmp, f"p{i}.py")
        with open(path, "w") as f:
            f.write(he.plain_script(p))
        scripts.append(path)

    # One at a time, paired.
    root = tempfile.mkdtemp(prefix="megatron-rl-bench-box-")
    os.chmod(root, 0o711)
    leases = [UidLease.acquire(), UidLease.acquire()] if is_root() else [None, None]
    boxes = {
        "sandbox": Sandbox(root, uid=leases[0].uid if leases[0] else None, persistent=True),
        "fresh": Sandbox(root, uid=leases[1].uid if leases[1] else None, persistent=False),
    }
    kinds = ("plain", "sandbox", "fresh")
    wall: dict[str, list[float]] = {k: [] for k in kinds}
    cpu = dict.fromkeys(kinds, 0.0)
    passed = dict.fromkeys(kinds, 0)

    def run_one(kind: str, i: int) -> None:
        c, t = _cpu_now(), time.perf_counter()
        if kind == "plain":
            ok = _run_plain(scripts[i], timeout)
        else:
            ok = run_check_tests(boxes[kind], programs[i], tests[i], timeout).reward == 1.0
        wall[kind].append(time.perf_counter() - t)
        cpu[kind] += _cpu_now() - c
        passed[kind] += ok

    try:
        for kind in kinds:  # warm-up, not counted: the persistent sandbox starts here
            run_one(kind, 0)
        wall = {k: [] for k in kinds}
        cpu = dict.fromkeys(kinds, 0.0)
        passed = dict.fromkeys(kinds, 0)
        for i in range(n):
            for kind in kinds[i % 3 :] + kinds[: i % 3]:
                run_one(kind, i)
    finally:
        for box in boxes.values():
            box.close()
        for lease in leases:
            if lease:
                lease.release()
        shutil.rmtree(root, ignore_errors=True)
    latency = {"passed_" + k: passed[k] for k in kinds}
    for k in kinds:
        latency[k + "_median_ms"] = _median_ms(wall[k])
        latency[k + "_cpu_mean_ms"] = 1000 * cpu[k] / n
    for k in ("sandbox", "fresh"):
        diff = [s - p for s, p in zip(wall[k], wall["plain"], strict=True)]
        latency[k + "_overhead_median_ms"] = _median_ms(diff)
        latency[k + "_overhead_p90_ms"] = 1000 * statistics.quantiles(diff, n=10)[-1]
        latency[k + "_cpu_overhead_mean_ms"] = 1000 * (cpu[k] - cpu["plain"]) / n

    # Throughput with a pool, interleaved with plain batches.
    def plain_batch() -> int:
        with concurrent.futures.ThreadPoolExecutor(workers) as ex:
            return sum(ex.map(lambda s: _run_plain(s, timeout), scripts))

    plain_s, box_s, plain_cpu, box_cpu = [], [], [], []
    try:
        with RewardPool(workers) as pool:
            pool.run_programs(programs[:8], tests[:8], timeout)  # warm-up: worker start, first sandbox probe
            worker_pids = [w.proc.pid for w in pool._workers]
            for _ in range(repeats):
                c, t = _children_cpu(), time.perf_counter()
                ok_plain = plain_batch()
                plain_s.append(time.perf_counter() - t)
                plain_cpu.append(_children_cpu() - c)
                c, t = _tree_cpu(worker_pids), time.perf_counter()
                ok_box = sum(r.reward for r in pool.run_programs(programs, tests, timeout))
                box_s.append(time.perf_counter() - t)
                box_cpu.append(_tree_cpu(worker_pids) - c)
            restarts = pool.restarts
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    throughput = {
        "workers": workers,
        "programs": n,
        "repeats": repeats,
        "passed_plain": ok_plain,
        "passed_sandbox": int(ok_box),
        "worker_restarts": restarts,
        "plain_programs_per_s": n / statistics.median(plain_s),
        "sandbox_programs_per_s": n / statistics.median(box_s),
        "plain_cpu_ms_per_program": 1000 * statistics.median(plain_cpu) / n,
        "sandbox_cpu_ms_per_program": 1000 * statistics.median(box_cpu) / n,
    }
    return {"latency": latency, "throughput": throughput}


# -- math ---------------------------------------------------------------------------------------------------

# (reference, right answers, wrong answers) for a parameter k: each group gets a reference of its own, as each
# prompt of a GRPO batch does, so the caches help only within a group.
_TEMPLATES: list[Callable[[int], tuple[str, list[str], list[str]]]] = [
    lambda k: (
        rf"\frac{{{k}}}{{{k + 1}}}",
        [f"{k}/{k + 1}", rf"\dfrac{{{2 * k}}}{{{2 * k + 2}}}"],
        [f"{k + 1}/{k}"],
    ),
    lambda k: (str(k / 4), [rf"\frac{{{k}}}{{4}}", str(k / 4)], [str(k / 4 + 1)]),
    lambda k: (rf"{k}\sqrt{{2}}", [rf"\sqrt{{{2 * k * k}}}", rf"{k}\sqrt2"], [rf"\sqrt{{{2 * k * k + 1}}}"]),
    lambda k: (f"[{k}, {k + 3})", [f"[{k},{k + 3})"], [f"({k}, {k + 3}]"]),
    lambda k: (rf"\{{{k}, {k + 1}\}}", [rf"\{{{k + 1},{k}\}}"], [rf"\{{{k}\}}"]),
    lambda k: (rf"{k}\%", [rf"{k}\%", str(k)], [rf"{k + 1}\%"]),
    lambda k: (f"(x+{k})^2", [f"x^2+{2 * k}x+{k * k}", f"(x+{k})^2"], [f"x^2+{k * k}"]),
    lambda k: (str(k), [str(k)], [str(k + 1)]),
    lambda k: (rf"(-\infty, {k}]", [rf"(-\infty,{k}]"], [rf"(-\infty, {k})"]),
]
_FILLER = "Let me reason step by step about the problem and check each case carefully. " * 25


def mixed_math_set(groups: int, group_size: int = 8, offset: int = 0) -> list[tuple[str, str]]:
    samples = []
    for g in range(groups):
        ref, right, wrong = _TEMPLATES[g % len(_TEMPLATES)](g + 2 + offset)
        for j in range(group_size):
            kind = j % 8
            if kind < 4:
                ans = right[j % len(right)]
            elif kind < 7:
                ans = wrong[j % len(wrong)]
            else:
                samples.append((f"<think>{_FILLER}</think>I am not sure.", ref))
                continue
            samples.append((f"<think>{_FILLER}</think>The answer is $\\boxed{{{ans}}}$.", ref))
    return samples


def bench_math(groups: int, workers: int) -> dict:
    samples = mixed_math_set(groups)
    warm = mixed_math_set(len(_TEMPLATES) * 20, offset=100_000)  # disjoint references: no cache hits
    for r, a in warm:
        mr.math_reward(r, a)
    cpu, t = time.process_time(), time.perf_counter()
    correct = sum(mr.math_reward(r, a) for r, a in samples)
    one_core_wall, one_core_cpu = time.perf_counter() - t, time.process_time() - cpu
    with RewardPool(workers) as pool:
        pool.score_math([r for r, _ in warm], [a for _, a in warm])
        pids = [w.proc.pid for w in pool._workers]
        cpu, t = _tree_cpu(pids), time.perf_counter()
        pooled = pool.score_math([r for r, _ in samples], [a for _, a in samples])
        pool_wall, pool_cpu = time.perf_counter() - t, _tree_cpu(pids) - cpu
    n = len(samples)
    return {
        "samples": n,
        "correct": int(correct),
        "pool_agrees": sum(pooled) == correct,
        "one_core_samples_per_s": n / one_core_wall,
        "one_core_samples_per_cpu_s": n / one_core_cpu,
        "pool_workers": workers,
        "pool_samples_per_s": n / pool_wall,
        "pool_samples_per_cpu_s": n / pool_cpu,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megatron-rl bench rewards", description=__doc__)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="code throughput repeats (median reported)")
    parser.add_argument("--math-groups", type=int, default=250, help="groups of 8 math samples")
    parser.add_argument("--skip-code", action="store_true")
    parser.add_argument("--skip-math", action="store_true")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)

    out: dict = {"machine": machine(), "argv": argv if argv is not None else sys.argv[1:]}
    print(f"machine: {out['machine']}")
    if not args.skip_code:
        code = out["code"] = bench_code(args.workers, args.repeats)
        lat, tp = code["latency"], code["throughput"]
        print(f"code, HumanEval canonical solutions ({tp['programs']} programs):")
        print(
            f"  one at a time ({lat['passed_plain']}/{lat['passed_sandbox']}/{lat['passed_fresh']} pass plain/"
            f"persistent sandbox/sandbox per program): wall median {lat['plain_median_ms']:.1f} /"
            f" {lat['sandbox_median_ms']:.1f} / {lat['fresh_median_ms']:.1f} ms; CPU mean"
            f" {lat['plain_cpu_mean_ms']:.1f} / {lat['sandbox_cpu_mean_ms']:.1f} / {lat['fresh_cpu_mean_ms']:.1f} ms"
        )
        for k, name in (("sandbox", "persistent sandbox"), ("fresh", "sandbox per program")):
            print(
                f"  {name} overhead per program: {lat[k + '_overhead_median_ms']:.1f} ms wall (median of pairs;"
                f" p90 {lat[k + '_overhead_p90_ms']:.1f} ms), {lat[k + '_cpu_overhead_mean_ms']:.1f} ms CPU (mean)"
            )
        for name, key in [("plain python3 ", "plain"), ("sandbox + pool", "sandbox")]:
            print(
                f"  {tp['workers']} workers, {name}: {tp[key + '_programs_per_s']:6.1f} programs/s, "
                f"{tp[key + '_cpu_ms_per_program']:5.1f} CPU-ms per program ({tp['passed_' + key]} pass)"
            )
    if not args.skip_math:
        m = out["math"] = bench_math(args.math_groups, args.workers)
        print(f"math, mixed set ({m['samples']} samples, {m['correct']} correct):")
        print(
            f"  one core, in process: {m['one_core_samples_per_s']:6.1f} samples/s "
            f"({m['one_core_samples_per_cpu_s']:.1f} per CPU-second)"
        )
        print(
            f"  RewardPool({m['pool_workers']} workers): {m['pool_samples_per_s']:6.1f} samples/s "
            f"({m['pool_samples_per_cpu_s']:.1f} per CPU-second; same rewards: {m['pool_agrees']})"
        )
    print(json.dumps(out))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
