"""NeMo-Run experiments for the megatron-rl stages: one `megatron-rl` command, a local or a Slurm executor.

    python -m launchers.math_stage --executor local                 # the tiny CPU config, through NeMo-Run
    python -m launchers.math_stage --executor slurm --model 7b --stage 2 model.path=/models/R1-7B ...

Slurm settings come from, in order of precedence: the command line (--account, --partition, --nodes,
--gpus-per-node, --time, --container-image), environment variables (MEGATRON_RL_SLURM_ACCOUNT,
MEGATRON_RL_SLURM_PARTITION, MEGATRON_RL_NODES, MEGATRON_RL_GPUS_PER_NODE, MEGATRON_RL_SLURM_TIME,
MEGATRON_RL_CONTAINER_IMAGE), then the config's `cluster:` section. The job runs one task per GPU
(`srun` sets SLURM_PROCID/SLURM_NTASKS; megatron_rl.distributed derives the rendezvous from them) and passes
--resume, so a job requeued after a failure (--retries N, or MEGATRON_RL_SLURM_RETRIES) or launched again with
the same output directory continues from the run's latest checkpoint.
Before submitting, the config is sized with `megatron-rl plan`: a config that does not fit is not submitted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import nemo_run as run
from nemo_run.config import get_nemorun_home, set_nemorun_home

from launchers.curriculum import MODELS, REPO, STAGES, TINY_CONFIG, stage_config, stage_overrides

ENV = {
    "account": "MEGATRON_RL_SLURM_ACCOUNT",
    "partition": "MEGATRON_RL_SLURM_PARTITION",
    "nodes": "MEGATRON_RL_NODES",
    "gpus_per_node": "MEGATRON_RL_GPUS_PER_NODE",
    "time": "MEGATRON_RL_SLURM_TIME",
    "container_image": "MEGATRON_RL_CONTAINER_IMAGE",
}


class LaunchError(ValueError):
    pass


def slurm_job_root(job_dir: str | None = None, ssh_host: str | None = None) -> str:
    """Where the Slurm job files (and, by default, the runs) go: --job-dir, else MEGATRON_RL_SLURM_JOB_DIR.

    Submitting from a login node (LocalTunnel), NeMo-Run writes the sbatch script and the code into its own
    experiment directory, $NEMORUN_HOME/experiments, and submits that path: so that directory is the job root, and
    a --job-dir makes NeMo-Run's home. Submitting over SSH, it is a directory on the cluster and must be given."""
    job_dir = job_dir or os.environ.get("MEGATRON_RL_SLURM_JOB_DIR")
    if ssh_host:
        if not job_dir:
            raise LaunchError(
                "--ssh-host needs --job-dir (or MEGATRON_RL_SLURM_JOB_DIR): a directory on the cluster for the "
                "job files, seen by its compute nodes"
            )
        return job_dir
    if job_dir:
        set_nemorun_home(str(Path(job_dir).resolve()))
    return os.path.join(get_nemorun_home(), "experiments")


def slurm_retries(flag: int | None) -> int:
    """--retries, else MEGATRON_RL_SLURM_RETRIES, else 0."""
    if flag is not None:
        return flag
    raw = os.environ.get("MEGATRON_RL_SLURM_RETRIES") or "0"
    if not raw.isdigit():
        raise LaunchError(f"MEGATRON_RL_SLURM_RETRIES must be a whole number, got {raw!r}")
    return int(raw)


@dataclass(frozen=True)
class ClusterSettings:
    nodes: int
    gpus_per_node: int
    account: str | None
    partition: str | None
    time: str
    container_image: str | None


def cluster_settings(cfg, flags: dict | None = None, env: dict | None = None) -> ClusterSettings:
    """Merge the config's cluster section, MEGATRON_RL_* variables and command-line flags (highest first)."""
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    env = os.environ if env is None else env
    merged = {}
    for key, var in ENV.items():
        if key in flags:
            merged[key] = flags[key]
        elif env.get(var):
            merged[key] = env[var]
        else:
            merged[key] = getattr(cfg.cluster, key)
    for key in ("nodes", "gpus_per_node"):
        try:
            merged[key] = int(merged[key])
        except ValueError:
            raise LaunchError(f"{key} must be an integer, got {merged[key]!r} (from {ENV[key]}?)") from None
        if merged[key] < 1:
            raise LaunchError(f"{key} must be at least 1, got {merged[key]}")
    return ClusterSettings(**merged)


def cluster_overrides(cfg, settings: ClusterSettings) -> list[str]:
    """Overrides for the machine counts the launch changed, so that the run's config (and `plan`) match the job.

    Account, partition, time and container are launch settings only; they stay out of the command line.
    """
    return [
        f"cluster.{key}={getattr(settings, key)}"
        for key in ("nodes", "gpus_per_node")
        if getattr(settings, key) != getattr(cfg.cluster, key)
    ]


def megatron_rl_script(
    command: str,
    config: Path,
    overrides: list[str],
    python: str = sys.executable,
    nproc: int = 1,
    resume: bool = False,
) -> run.Script:
    """`megatron-rl COMMAND --config CONFIG [--resume] overrides...` as a NeMo-Run script (`python -m
    megatron_rl.cli`).

    nproc > 1 (a local multi-GPU node) starts the ranks with torchrun; under Slurm, srun starts one task per GPU.
    `resume`: continue from the run's latest checkpoint when there is one (a requeued or relaunched job).
    """
    args = [command, "--config", str(config), *(["--resume"] if resume else []), *overrides]
    if nproc > 1:
        args = ["--standalone", f"--nproc-per-node={nproc}", "-m", "megatron_rl.cli", *args]
        return run.Script(path="torch.distributed.run", m=True, entrypoint=python, args=args)
    return run.Script(path="megatron_rl.cli", m=True, entrypoint=python, args=args)


def local_executor(env: dict[str, str] | None = None) -> run.LocalExecutor:
    return run.LocalExecutor(ntasks_per_node=1, env_vars=dict(env or {}))


def slurm_executor(
    settings: ClusterSettings,
    job_root: str,
    ssh_host: str | None = None,
    ssh_user: str | None = None,
    env: dict[str, str] | None = None,
    retries: int = 0,
) -> run.SlurmExecutor:
    """A whole-node Slurm executor: `nodes` nodes, one task and one GPU per task on each of `gpus_per_node`.

    `job_root`: from `slurm_job_root` (with the same ssh_host). `retries`: how many times NeMo-Run's batch script
    requeues the job when the trainer exits with an error (a crashed node, a preemption); the job's command
    carries --resume, so each retry continues from the last checkpoint."""
    if retries < 0:
        raise LaunchError(f"retries must be 0 or more, got {retries}")
    if not settings.account:
        raise LaunchError(
            f"no Slurm account: pass --account, set {ENV['account']} or cluster.account in the config"
        )
    if ssh_host:
        tunnel = run.SSHTunnel(host=ssh_host, user=ssh_user or os.environ.get("USER", ""), job_dir=job_root)
    else:  # submitting from a machine that has sbatch (a login node): NeMo-Run's own experiment directory
        tunnel = run.LocalTunnel(job_dir=job_root)
    return run.SlurmExecutor(
        account=settings.account,
        partition=settings.partition,
        time=settings.time,
        nodes=settings.nodes,
        ntasks_per_node=settings.gpus_per_node,
        gpus_per_node=settings.gpus_per_node,
        job_name_prefix="megatron_rl.",
        exclusive=True,
        mem="0",
        container_image=settings.container_image,
        env_vars=dict(env or {}),
        tunnel=tunnel,
        retries=retries,
    )


def run_experiment(
    name: str, script: run.Script, executor, dryrun: bool = False, detach: bool = False
) -> dict:
    """Run `script` as the one task of a NeMo-Run experiment; wait for it unless `detach` (Slurm)."""
    with run.Experiment(name, executor=executor, log_level="WARN", enable_goodbye_message=False) as exp:
        exp.add(script, name=name, tail_logs=False)
        if dryrun:
            exp.dryrun(log=True)
            return {"experiment_id": exp._id, "status": "DRYRUN"}
        exp.run(sequential=True, detach=detach)
    job = exp.jobs[0]
    state = job.state.name if job.state is not None else "UNKNOWN"
    result = {"experiment_id": exp._id, "status": state, "job_dir": job.executor.job_dir}
    if isinstance(executor, run.SlurmExecutor):  # the handle is slurm_tunnel://nemo_run/<job id>
        result["slurm_job_id"] = job.handle.rsplit("/", 1)[-1]
    return result


def sbatch_script(name: str, script: run.Script, executor: run.SlurmExecutor) -> str:
    """The sbatch script NeMo-Run would submit for `script` (renders it; submits nothing)."""
    with run.Experiment(name, executor=executor, log_level="ERROR", enable_goodbye_message=False) as exp:
        exp.add(script, name=name, tail_logs=False)
        exp.dryrun(log=False)
        return exp.jobs[0]._dryrun_info.request.materialize()


# ---------------------------------------------------------------------------------------------- command line


def add_launch_arguments(p: argparse.ArgumentParser, local_output: str) -> None:
    """The executor and where it runs: the flags every launcher shares. local_output: whose run.output_dir a
    local run keeps by default."""
    p.add_argument("--executor", choices=("local", "slurm"), default="local")
    p.add_argument(
        "--output-dir",
        default=None,
        help=f"run.output_dir (default: local, {local_output} under this repo; Slurm, JOB_DIR/runs)",
    )
    p.add_argument(
        "--dryrun", action="store_true", help="print what would run (the sbatch script(s) on Slurm)"
    )
    p.add_argument("--detach", action="store_true", help="Slurm: return after submitting")
    for key in ENV:
        p.add_argument("--" + key.replace("_", "-"), dest=key, default=None, help=f"Slurm (env {ENV[key]})")
    p.add_argument(
        "--job-dir",
        default=None,
        help="Slurm: the job files' directory (env MEGATRON_RL_SLURM_JOB_DIR); from a login node, NeMo-Run's home "
        "(default $NEMORUN_HOME, ~/.nemo_run), over SSH a directory on the cluster (required)",
    )
    p.add_argument("--ssh-host", default=None, help="Slurm: submit over SSH to this login node")
    p.add_argument("--ssh-user", default=None)
    p.add_argument(
        "--retries",
        type=int,
        default=None,
        help="Slurm: requeue a job that failed this many times, resuming from its last checkpoint "
        "(env MEGATRON_RL_SLURM_RETRIES)",
    )
    p.add_argument("--python", default=None, help="python on the cluster (Slurm default: python)")


def _parser(domain: str) -> argparse.ArgumentParser:
    stages = STAGES.get(domain, {})
    p = argparse.ArgumentParser(
        prog=f"python -m launchers.{domain if domain == 'sft' else domain + '_stage'}",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument(
        "--model",
        choices=("tiny", *MODELS),
        default=None,
        help="which config: tiny (configs/tiny_math.yaml, the default for --executor local) or a stage config",
    )
    if stages:
        p.add_argument(
            "--stage", choices=tuple(stages), default="1", help="curriculum stage (launchers/curriculum.py)"
        )
    p.add_argument("--config", type=Path, default=None, help="a config file instead of --model's")
    add_launch_arguments(p, "the config's")
    p.add_argument(
        "--no-plan", action="store_true", help="submit even when `megatron-rl plan` says it does not fit"
    )
    p.add_argument("overrides", nargs="*", help="config overrides, key=value")
    return p


def main(domain: str, argv: list[str] | None = None) -> int:
    """`domain`: math, code or sft (the SFT warm start only: `megatron-rl sft`)."""
    from megatron_rl.config import ConfigError, load_config
    from megatron_rl.plan import PlanError, format_plan, make_plan

    args = _parser(domain).parse_args(argv)
    model = args.model or ("tiny" if args.executor == "local" else "7b")
    overrides: list[str] = []
    if args.config is not None:
        config = args.config.resolve()
    elif model == "tiny" or domain == "sft":
        if domain == "code":
            print(
                "error: there is no tiny code config (the tiny model cannot write programs); pass --model or --config",
                file=sys.stderr,
            )
            return 2
        config = TINY_CONFIG
    else:
        config = stage_config(domain, model)
        overrides = stage_overrides(domain, model, args.stage)
    overrides += list(args.overrides)
    slurm = args.executor == "slurm"
    try:
        job_root = slurm_job_root(args.job_dir, args.ssh_host) if slurm else None
        cfg = load_config(config, overrides)
        settings = cluster_settings(cfg, {k: getattr(args, k) for k in ENV})
        overrides += cluster_overrides(cfg, settings)
        if args.output_dir:
            output_dir = args.output_dir
        elif slurm:  # the job runs from NeMo-Run's copy of the code: keep runs next to it, on the cluster
            output_dir = str(Path(job_root) / "runs" if args.ssh_host else Path(get_nemorun_home()) / "runs")
        else:
            output_dir = str(REPO / cfg.run.output_dir)  # an absolute output_dir stays as it is
        overrides.append(f"run.output_dir={output_dir}")
        cfg = load_config(config, overrides)
        if cfg.rollout.placement == "separate":
            raise LaunchError(
                "rollout.placement=separate: the engine servers on their own nodes are started by the sbatch "
                "scripts (sbatch --nodes=N slurm/math_stage.sh rollout.placement=separate "
                "rollout.engine_nodes=E); this launcher starts trainer ranks only (use placement colocated)"
            )
        if slurm and not args.no_plan:
            plan = make_plan(cfg, str(config))
            print(format_plan(plan), file=sys.stderr)
            if not plan.fits:
                print(
                    "error: the config does not fit (see the plan above); --no-plan submits anyway",
                    file=sys.stderr,
                )
                return 1
    except (ConfigError, PlanError, LaunchError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    command = "sft" if domain == "sft" else "train"
    name = f"{domain}_{cfg.run.name}" if domain == "sft" else cfg.run.name
    try:
        if args.executor == "local":
            if settings.nodes > 1:
                raise LaunchError(
                    f"the local executor runs one node; the config wants cluster.nodes={settings.nodes}"
                )
            nproc = settings.gpus_per_node  # the tiny config's cluster is one node of one device
            script = megatron_rl_script(command, config, overrides, args.python or sys.executable, nproc)
            executor = local_executor()
        else:  # the job runs in NeMo-Run's git-archive copy of this repo: repo files by relative path
            config_arg = config.relative_to(REPO) if config.is_relative_to(REPO) else config
            script = megatron_rl_script(command, config_arg, overrides, args.python or "python", resume=True)
            retries = slurm_retries(args.retries)
            executor = slurm_executor(settings, job_root, args.ssh_host, args.ssh_user, retries=retries)
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = run_experiment(name, script, executor, dryrun=args.dryrun, detach=args.detach)
    result["run_dir"] = str(Path(output_dir) / cfg.run.name)
    print("\n" + json.dumps(result))  # on its own line, after NeMo-Run's progress display
    return (
        0
        if result["status"] in ("SUCCEEDED", "DRYRUN") or (args.detach and result["status"] != "FAILED")
        else 1
    )
