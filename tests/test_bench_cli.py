"""`megatron-rl bench`: one subcommand per module of megatron_rl/bench/, listed with its line of help."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

import megatron_rl.bench
from megatron_rl.cli import BENCHMARKS, app


def test_bench_lists_every_benchmark_module():
    modules = {p.stem for p in Path(megatron_rl.bench.__file__).parent.glob("*.py")} - {"__init__", "common"}
    assert set(BENCHMARKS) == modules
    # No NAME prints the same help as --help, with click's usage-error exit status 2.
    for args in (["bench"], ["bench", "--help"]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == (2 if args == ["bench"] else 0), result.output
        listed = {line.strip("│ ").split()[0] for line in result.output.splitlines() if line.startswith("│ ")}
        assert modules <= listed, result.output


def test_bench_help_is_the_benchmarks_own():
    result = CliRunner().invoke(app, ["bench", "packing", "--help"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("usage: megatron-rl bench packing")
    assert "--budget-factor" in result.output
