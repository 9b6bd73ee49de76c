#!/usr/bin/env bash
# AceReason stage 1: math-only RL (`megatron-rl train --config $CONFIG --resume`), submitted from the repo root:
#
#   MODEL_PATH=/ckpt/DeepSeek-R1-Distill-Qwen-7B DATA_PATH=/data/math.parquet sbatch slurm/math_stage.sh
#   CONFIG=configs/math_stage_14b.yaml sbatch --nodes=8 slurm/math_stage.sh run.steps=200   # options, overrides
#
# Machines (sbatch options; the #SBATCH lines below are the defaults, command-line options replace them):
#   --nodes=4 --ntasks-per-node=8 --gpus-per-node=8   one trainer process (task) per GPU; the 7B config is sized
#   --cpus-per-task=16 --time=04:00:00                for 4 x 8 GPUs (its cluster: section, `megatron-rl plan`)
#   --signal=B:USR1@600                               checkpoint and requeue 10 min before the time limit
# Settings (environment variables, all optional unless the config needs them):
#   CONFIG          configs/math_stage_7b.yaml   the stage config (relative paths are from the repo root)
#   MODEL_PATH      (the config's model.path)    HF checkpoint to start from -> model.path; required when the
#                                                config is sized for a real model and names none
#   DATA_PATH       (the config's)               training prompts, JSONL/Parquet -> data.train_path; required
#                                                when the config reads a file and names none
#   EVAL_DATA_PATH  (the config's)               held-out prompts -> data.eval_path
#   OUTPUT_DIR      runs                         -> run.output_dir; the run is OUTPUT_DIR/<run.name>
#   RUN_NAME        (the config's run.name)      -> run.name
#   LOG_DIR         $OUTPUT_DIR/logs             the job's log: LOG_DIR/<job name>-<job id>.out
#   PYTHON          .venv/bin/python or python3  the environment with megatron-rl installed
#   ROLLOUT_PLACEMENT (the config's)             -> rollout.placement: colocated or separate (see Placement)
#   ENGINE_NODES    (the config's)               -> rollout.engine_nodes: nodes for vLLM when separate
#   SRUN_WAIT       300                          seconds the other ranks get once one has exited
#   REPO_DIR        the submit directory         where slurm/common.sh and relative paths are found
# Arguments after the script are passed to the trainer as dotted overrides (key=value).
#
# Placement (rollout.placement): colocated, the trainer runs the vLLM rollout engine(s) in its own processes
# (rank 0's, or every rank's with rollout.engine_ranks=all). Separate, the job's last rollout.engine_nodes nodes
# run `megatron-rl serve-rollout`, one engine server per rollout.tensor_parallel_size GPUs, and the trainer runs
# on the other nodes; include those nodes in --nodes, e.g. ROLLOUT_PLACEMENT=separate ENGINE_NODES=1
# sbatch --nodes=5 slurm/math_stage.sh. Preemption: on SIGUSR1 the trainer saves a checkpoint after its current
# step and exits with code 85, and the job requeues itself; the requeued job resumes from that checkpoint.
#SBATCH --job-name=mrl-math
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
if [[ ! -f $REPO_DIR/slurm/common.sh ]]; then
	echo "error: $REPO_DIR/slurm/common.sh not found: submit from the repository root or set REPO_DIR" >&2
	exit 2
fi
STAGE=math
DEFAULT_CONFIG=configs/math_stage_7b.yaml
# shellcheck source=slurm/common.sh
source "$REPO_DIR/slurm/common.sh"
