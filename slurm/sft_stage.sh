#!/usr/bin/env bash
# SFT warm start only (`megatron-rl sft --config $CONFIG`: the config's SFT, RL steps = 0; writes
# OUTPUT_DIR/<run.name>/sft_model). The SFT warm start exists for the synthetic tasks (the tiny CPU config);
# the 7B/14B stages start from already distilled checkpoints and go straight to slurm/math_stage.sh.
#
#   sbatch slurm/sft_stage.sh
#   sbatch --ntasks-per-node=2 slurm/sft_stage.sh sft.max_steps=200   # sbatch options, then overrides
#
# Machines (sbatch options; the #SBATCH lines below are the defaults, command-line options replace them):
#   --nodes=1 --ntasks-per-node=8 --gpus-per-node=8   one trainer process (task) per GPU
#   --cpus-per-task=16 --time=04:00:00
# Settings (environment variables, all optional unless the config needs them):
#   CONFIG          configs/tiny_math.yaml       the config whose sft section runs (paths from the repo root)
#   MODEL_PATH      (the config's model.path)    HF checkpoint to start from -> model.path
#   DATA_PATH       (the config's)               -> data.train_path
#   EVAL_DATA_PATH  (the config's)               -> data.eval_path
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
# Placement: the vLLM engine (held-out evaluation) runs colocated, inside rank 0's process, or with
# rollout.placement=separate on the job's last rollout.engine_nodes nodes, as in slurm/math_stage.sh. Ten minutes
# before the time limit (USR1) SFT checkpoints after its current step and the job is requeued; it continues there.
#SBATCH --job-name=mrl-sft
#SBATCH --nodes=1
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
STAGE=sft
DEFAULT_CONFIG=configs/tiny_math.yaml
# shellcheck source=slurm/common.sh
source "$REPO_DIR/slurm/common.sh"
