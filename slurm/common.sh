# shellcheck shell=bash
# The body shared by slurm/{sft,math,code}_stage.sh: sourced by them, never run or submitted on its own.
#
# The stage script sets STAGE (sft | math | code) and DEFAULT_CONFIG, then sources this file, which
#   1. checks the settings (one line naming what is missing or wrong, exit 2),
#   2. sends its output to $LOG_DIR/<job name>-<job id>.out (appended to across requeues),
#   3. starts one trainer process per task with srun (torch.distributed rendezvous from Slurm's variables:
#      MASTER_ADDR = first host of the job, MASTER_PORT derived from the job id),
#   4. on SIGUSR1 (the time-limit warning, --signal=B:USR1@...) asks the trainer to checkpoint and stop after its
#      current step, and requeues the job when it did; the requeued job resumes from that checkpoint.
# Settings and their defaults are listed in the stage scripts' headers and in docs/launching.md.

set -euo pipefail

die() {
	echo "error: $*" >&2
	exit 2
}

[[ -n ${SLURM_JOB_ID:-} ]] || die "not inside a Slurm job (SLURM_JOB_ID is unset): submit with 'sbatch slurm/${STAGE:-math}_stage.sh'"
[[ -n ${STAGE:-} ]] || die "STAGE is not set (sft, math or code)"
[[ -n ${DEFAULT_CONFIG:-} ]] || die "DEFAULT_CONFIG is not set by the stage script"

EXIT_PREEMPTED=85 # megatron_rl/train/preemption.py: the trainer checkpointed and stopped on request

cd "$REPO_DIR"
CONFIG=${CONFIG:-$DEFAULT_CONFIG}
OUTPUT_DIR=${OUTPUT_DIR:-runs}
LOG_DIR=${LOG_DIR:-$OUTPUT_DIR/logs}
if [[ -z ${PYTHON:-} ]]; then
	if [[ -x $REPO_DIR/.venv/bin/python ]]; then PYTHON=$REPO_DIR/.venv/bin/python; else PYTHON=python3; fi
fi
SRUN_WAIT=${SRUN_WAIT:-300}

[[ -f $CONFIG ]] || die "CONFIG=$CONFIG does not exist (relative paths are from $REPO_DIR)"
[[ -z ${MODEL_PATH:-} || -d $MODEL_PATH ]] || die "MODEL_PATH=$MODEL_PATH is not a directory"
[[ -z ${DATA_PATH:-} || -e $DATA_PATH ]] || die "DATA_PATH=$DATA_PATH does not exist"
[[ -z ${EVAL_DATA_PATH:-} || -e $EVAL_DATA_PATH ]] || die "EVAL_DATA_PATH=$EVAL_DATA_PATH does not exist"
command -v "$PYTHON" >/dev/null 2>&1 || die "PYTHON=$PYTHON is not an executable (set PYTHON to the environment's python)"

# Dotted-key overrides for the trainer: the settings above, then the script's own arguments (key=value ...).
overrides=("run.output_dir=$OUTPUT_DIR")
[[ -z ${RUN_NAME:-} ]] || overrides+=("run.name=$RUN_NAME")
[[ -z ${MODEL_PATH:-} ]] || overrides+=("model.path=$MODEL_PATH")
[[ -z ${DATA_PATH:-} ]] || overrides+=("data.train_path=$DATA_PATH")
[[ -z ${EVAL_DATA_PATH:-} ]] || overrides+=("data.eval_path=$EVAL_DATA_PATH")
[[ -z ${ROLLOUT_PLACEMENT:-} ]] || overrides+=("rollout.placement=$ROLLOUT_PLACEMENT")
overrides+=("$@")

# Validate the config once here (a config error would otherwise be printed by every rank), and name the
# variable a config needs but did not get: a config sized for a real model (model.architecture) without
# model.path needs MODEL_PATH; one that reads prompts from a file without data.train_path needs DATA_PATH.
# A sized config whose cluster: section differs from this job's nodes and tasks gets a warning.
checks=$("$PYTHON" - "$CONFIG" "${overrides[@]}" 2>&1 <<'PY'
import os
import sys

from megatron_rl.config import ConfigError, load_config

path = sys.argv[1]
try:
    cfg = load_config(path, sys.argv[2:])
except ConfigError as e:
    sys.exit(f"error: {e}")
architecture = getattr(cfg.model, "architecture", None)
if architecture and not cfg.model.path:
    sys.exit(f"error: MODEL_PATH is required: {path} is sized for {architecture} and sets no model.path")
if cfg.data.source == "file" and not cfg.data.train_path:
    sys.exit(f"error: DATA_PATH is required: {path} reads prompts from a file and sets no data.train_path")
cluster = getattr(cfg, "cluster", None)
nodes, tasks = int(os.environ.get("SLURM_JOB_NUM_NODES", 1)), int(os.environ.get("SLURM_NTASKS", 1))
if architecture and cluster and (nodes, tasks) != (cluster.nodes, cluster.nodes * cluster.gpus_per_node):
    print(f"warning: {path} is sized for {cluster.nodes} node(s) x {cluster.gpus_per_node} GPU(s) (its cluster: "
          f"section, see megatron-rl plan); this job has {nodes} node(s) and {tasks} task(s)")
PY
) || {
	echo "${checks:-error: the config check failed}" >&2
	exit 2
}

mkdir -p "$OUTPUT_DIR" "$LOG_DIR"
LOG_FILE=$LOG_DIR/${SLURM_JOB_NAME:-$STAGE}-$SLURM_JOB_ID.out
[[ -z $checks ]] || echo "$checks"
echo "megatron-rl $STAGE stage: job $SLURM_JOB_ID, log $LOG_FILE"
exec >>"$LOG_FILE" 2>&1
[[ -z $checks ]] || echo "$checks"

MASTER_ADDR=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-127.0.0.1}" | head -n 1)
MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000)) # the same formula as megatron_rl.distributed.slurm_rendezvous
export MASTER_ADDR MASTER_PORT
if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$SLURM_CPUS_PER_TASK}; fi

# The trainer polls this file after every RL step (preemption.py). A file and not a signal to the step: Slurm
# delivers a step's signals to all of its processes, vLLM's engine and the reward workers included.
MEGATRON_RL_STOP_FILE=$(cd "$OUTPUT_DIR" && pwd)/.stop-$SLURM_JOB_ID
export MEGATRON_RL_STOP_FILE
rm -f "$MEGATRON_RL_STOP_FILE"

case $STAGE in
sft) cmd=(sft --config "$CONFIG" --resume) ;;
math | code) cmd=(train --config "$CONFIG" --resume) ;;
*) die "STAGE=$STAGE: expected sft, math or code" ;;
esac

got_signal=""
# shellcheck disable=SC2317 # called by the traps below
request_stop() {
	got_signal=$1
	interrupted=1
	echo "[$(date '+%F %T')] batch script: SIG$1, asking the trainer to checkpoint and stop after its current step"
	touch "$MEGATRON_RL_STOP_FILE"
}
trap 'request_stop USR1' USR1
trap 'request_stop TERM' TERM

echo "[$(date '+%F %T')] job $SLURM_JOB_ID (${SLURM_JOB_NAME:-}) restart ${SLURM_RESTART_COUNT:-0}:" \
	"${SLURM_JOB_NUM_NODES:-1} node(s) [${SLURM_JOB_NODELIST:-}], ${SLURM_NTASKS:-1} task(s), master $MASTER_ADDR:$MASTER_PORT"
echo "[$(date '+%F %T')] $PYTHON -m megatron_rl.cli ${cmd[*]} ${overrides[*]}"

# srun in the background so that the traps run while it works; --wait: once one task has ended, the others get
# SRUN_WAIT seconds to end too (a crashed rank must not leave the rest blocked in a collective forever);
# --kill-on-bad-exit=0: ranks leaving with code 85 one after another must not be killed (their code matters).
srun --label --wait="$SRUN_WAIT" --kill-on-bad-exit=0 "$PYTHON" -m megatron_rl.cli "${cmd[@]}" "${overrides[@]}" &
srun_pid=$!
while :; do
	interrupted=""
	rc=0
	wait "$srun_pid" || rc=$?
	# A trapped signal cuts `wait` short (status 128 + signal): srun is still running, wait again.
	[[ -n $interrupted && $rc -gt 128 ]] || break
done
rm -f "$MEGATRON_RL_STOP_FILE"
echo "[$(date '+%F %T')] trainer exited with code $rc"

if [[ $rc == "$EXIT_PREEMPTED" && $got_signal != TERM ]]; then
	# Time limit ahead (or a signal sent to the trainer itself): the checkpoint is written, run again from it.
	# SIGTERM is left alone: it comes from scancel (stay cancelled) or from Slurm's own preemption, which
	# requeues a --requeue job by itself.
	echo "[$(date '+%F %T')] requeueing job $SLURM_JOB_ID; it resumes from the checkpoint"
	scontrol requeue "$SLURM_JOB_ID"
	exit 0
fi
exit "$rc"
