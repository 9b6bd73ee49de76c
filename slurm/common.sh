# shellcheck shell=bash
# The body shared by slurm/{sft,math,code}_stage.sh and slurm/recipe.sh (for a recipe's stage): sourced by them,
# never run or submitted on its own.
#
# The stage script sets STAGE (sft | math | code) and DEFAULT_CONFIG, then sources this file, which
#   1. checks the settings (one line naming what is missing or wrong, exit 2),
#   2. sends its output to $LOG_DIR/<job name>-<job id>.out (appended to across requeues),
#   3. starts one trainer process per task with srun (torch.distributed rendezvous from Slurm's variables:
#      MASTER_ADDR = first host of the job, MASTER_PORT derived from the job id); with rollout.placement=separate
#      the last rollout.engine_nodes nodes run vLLM engine servers (`megatron-rl serve-rollout`, one per
#      rollout.tensor_parallel_size GPUs) in a second step and the trainer runs on the other nodes,
#   4. on SIGUSR1 (the time-limit warning, --signal=B:USR1@...) asks the trainer to checkpoint and stop after its
#      current step, and requeues the job when it did; the requeued job resumes from that checkpoint,
#   5. once the trainer exited 0, calls the sourcing script's stage_finished function when it defines one.
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
# Engines on every trainer rank (engine_ranks=all, the 7B/14B configs') are a colocated layout: switching a
# config to separate by the variable also switches that to one engine client on rank 0.
[[ ${ROLLOUT_PLACEMENT:-} != separate ]] || overrides+=("rollout.engine_ranks=driver")
[[ -z ${ENGINE_NODES:-} ]] || overrides+=("rollout.engine_nodes=$ENGINE_NODES")
overrides+=("$@")

# Validate the config once here (a config error would otherwise be printed by every rank), and name the
# variable a config needs but did not get: a config sized for a real model (model.architecture) without
# model.path needs MODEL_PATH; one that reads prompts from a file without data.train_path needs DATA_PATH.
# A sized config whose cluster: section differs from this job's nodes and tasks gets a warning. Its last line,
# "@rollout <placement> <engine nodes> <rollout TP> <rendezvous dir>", is for this script (not printed).
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
rollout = cfg.rollout
if rollout.placement == "separate" and rollout.engine_ranks == "all":
    sys.exit("error: rollout.engine_ranks=all puts the engines on the trainer's ranks, rollout.placement=separate on "
             "their own nodes: add rollout.engine_ranks=driver")
rendezvous = rollout.engine_rendezvous or os.path.join(cfg.run.output_dir, cfg.run.name, "engines")
print("@rollout", rollout.placement, rollout.engine_nodes, rollout.tensor_parallel_size, os.path.abspath(rendezvous))
PY
) || {
	echo "${checks:-error: the config check failed}" >&2
	exit 2
}
placement=colocated
messages=""
while IFS= read -r line; do
	if [[ $line == "@rollout "* ]]; then
		read -r placement engine_nodes rollout_tp rendezvous <<<"${line#@rollout }"
	else
		messages+=${messages:+$'\n'}$line
	fi
done <<<"$checks"
checks=$messages

# placement=separate: the last rollout.engine_nodes nodes of the job run the engine servers, the others train.
if [[ $placement == separate ]]; then
	num_nodes=${SLURM_JOB_NUM_NODES:-1}
	((engine_nodes > 0)) || die "rollout.engine_nodes is 0 with rollout.placement=separate: set it (or ENGINE_NODES) to the number of nodes for vLLM, 1 to nodes - 1"
	((engine_nodes < num_nodes)) || die "rollout.engine_nodes=$engine_nodes leaves no node to train on: this job has $num_nodes node(s) (sbatch --nodes=$((engine_nodes + 1)) or more)"
	# One engine per rollout.tensor_parallel_size GPUs of an engine node (one per node on CPU-only nodes).
	gpus_per_node=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-0}}
	gpus_per_node=${gpus_per_node##*:} # "h100:8" -> 8
	[[ $gpus_per_node =~ ^[0-9]+$ ]] || gpus_per_node=0
	engine_opts=()
	if ((gpus_per_node > 0)); then
		((gpus_per_node % rollout_tp == 0)) || die "rollout.tensor_parallel_size=$rollout_tp does not divide the $gpus_per_node GPU(s) per node: no whole number of engines per engine node"
		engines_per_node=$((gpus_per_node / rollout_tp))
		engine_opts+=("--gpus-per-task=$rollout_tp")
	else
		engines_per_node=1
	fi
	# The node's CPUs go to its engines (vLLM's TP workers and tokenizers run in the engine's task).
	if [[ ${SLURM_CPUS_ON_NODE:-} =~ ^[0-9]+$ ]] && ((SLURM_CPUS_ON_NODE >= engines_per_node)); then
		engine_opts+=("--cpus-per-task=$((SLURM_CPUS_ON_NODE / engines_per_node))")
	fi
	num_engines=$((engine_nodes * engines_per_node))
	job_hosts=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-}") || die "scontrol show hostnames '${SLURM_JOB_NODELIST:-}' failed: cannot split the job's nodes"
	mapfile -t hosts <<<"$job_hosts"
	((${#hosts[@]} == num_nodes)) || die "SLURM_JOB_NODELIST=${SLURM_JOB_NODELIST:-} has ${#hosts[@]} host(s), SLURM_JOB_NUM_NODES=$num_nodes"
	trainer_nodes=$((num_nodes - engine_nodes))
	trainer_hosts=("${hosts[@]:0:trainer_nodes}")
	engine_hosts=("${hosts[@]:trainer_nodes}")
	tasks_per_node=${SLURM_NTASKS_PER_NODE:-$((${SLURM_NTASKS:-$num_nodes} / num_nodes))}
	((tasks_per_node > 0)) || tasks_per_node=1
	trainer_tasks=$((trainer_nodes * tasks_per_node))
	overrides+=("rollout.num_engines=$num_engines" "rollout.engine_rendezvous=$rendezvous"
		"rollout.broadcast_host=${trainer_hosts[0]}")
fi

mkdir -p "$OUTPUT_DIR" "$LOG_DIR"
LOG_FILE=$LOG_DIR/${SLURM_JOB_NAME:-$STAGE}-$SLURM_JOB_ID.out
[[ -z $checks ]] || echo "$checks"
echo "megatron-rl $STAGE stage: job $SLURM_JOB_ID, log $LOG_FILE"
exec >>"$LOG_FILE" 2>&1
[[ -z $checks ]] || echo "$checks"

if [[ $placement == separate ]]; then
	MASTER_ADDR=${trainer_hosts[0]}
else
	MASTER_ADDR=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-127.0.0.1}" | head -n 1)
fi
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

engine_pid=""
if [[ $placement == separate ]]; then
	# The job id survives a requeue, and so would the servers' files of the last run: start from a clean
	# rendezvous directory. Engine output is prefixed "engine " (the trainer's lines start with the rank).
	mkdir -p "$rendezvous"
	rm -f "$rendezvous"/engine_*.json
	engine_list=$(
		IFS=,
		echo "${engine_hosts[*]}"
	)
	trainer_list=$(
		IFS=,
		echo "${trainer_hosts[*]}"
	)
	echo "[$(date '+%F %T')] rollout engines: $num_engines serve-rollout task(s) on $engine_nodes node(s) [$engine_list]," \
		"$engines_per_node per node, rollout TP $rollout_tp, rendezvous $rendezvous"
	echo "[$(date '+%F %T')] trainer: $trainer_nodes node(s) [$trainer_list], $trainer_tasks task(s)"
	echo "[$(date '+%F %T')] $PYTHON -m megatron_rl.cli serve-rollout --rendezvous $rendezvous"
	# shellcheck disable=SC2016 # expanded by the task's shell
	where='echo "$1 $SLURM_PROCID on $SLURMD_NODENAME (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-})"; shift; exec "$@"'
	srun --label --wait="$SRUN_WAIT" --kill-on-bad-exit=0 --job-name=mrl-engines --nodes="$engine_nodes" \
		--nodelist="$engine_list" --ntasks="$num_engines" --ntasks-per-node="$engines_per_node" "${engine_opts[@]}" \
		bash -c "$where" where "engine server" "$PYTHON" -m megatron_rl.cli serve-rollout --rendezvous "$rendezvous" \
		2>&1 | sed -u 's/^/engine /' &
	engine_pid=$! # sed's; it ends with srun, and waiting for it gives srun's exit code (pipefail)
fi
echo "[$(date '+%F %T')] $PYTHON -m megatron_rl.cli ${cmd[*]} ${overrides[*]}"

# srun in the background so that the traps run while it works; --wait: once one task has ended, the others get
# SRUN_WAIT seconds to end too (a crashed rank must not leave the rest blocked in a collective forever);
# --kill-on-bad-exit=0: ranks leaving with code 85 one after another must not be killed (their code matters).
if [[ $placement == separate ]]; then
	srun --label --wait="$SRUN_WAIT" --kill-on-bad-exit=0 --nodes="$trainer_nodes" --nodelist="$trainer_list" \
		--ntasks="$trainer_tasks" --ntasks-per-node="$tasks_per_node" \
		bash -c "$where" where "trainer rank" "$PYTHON" -m megatron_rl.cli "${cmd[@]}" "${overrides[@]}" &
else
	srun --label --wait="$SRUN_WAIT" --kill-on-bad-exit=0 "$PYTHON" -m megatron_rl.cli "${cmd[@]}" "${overrides[@]}" &
fi
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

if [[ -n $engine_pid ]]; then
	# The trainer tells the servers to shut down when it ends, and a server whose trainer died exits by itself;
	# servers that never saw a trainer would wait forever: SRUN_WAIT seconds, then the step is cancelled.
	deadline=$((SECONDS + SRUN_WAIT))
	while kill -0 "$engine_pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 1; done
	if kill -0 "$engine_pid" 2>/dev/null; then
		mapfile -t steps < <(squeue --steps --jobs="$SLURM_JOB_ID" --noheader --format='%i %j' |
			awk '$2 == "mrl-engines" { print $1 }')
		echo "[$(date '+%F %T')] engine servers still running $SRUN_WAIT s after the trainer: cancelling step ${steps[*]:-?}"
		((${#steps[@]} == 0)) || scancel "${steps[@]}" || true
		deadline=$((SECONDS + 60))
		while kill -0 "$engine_pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 1; done
	fi
	if kill -0 "$engine_pid" 2>/dev/null; then
		echo "[$(date '+%F %T')] engine servers still running after scancel: left to Slurm's cleanup at the job's end"
	else
		engine_rc=0
		wait "$engine_pid" || engine_rc=$?
		echo "[$(date '+%F %T')] engine servers exited with code $engine_rc"
	fi
fi

if [[ $rc == "$EXIT_PREEMPTED" && $got_signal != TERM ]]; then
	# Time limit ahead (or a signal sent to the trainer itself): the checkpoint is written, run again from it.
	# SIGTERM is left alone: it comes from scancel (stay cancelled) or from Slurm's own preemption, which
	# requeues a --requeue job by itself.
	echo "[$(date '+%F %T')] requeueing job $SLURM_JOB_ID; it resumes from the checkpoint"
	scontrol requeue "$SLURM_JOB_ID"
	exit 0
fi
# slurm/recipe.sh defines stage_finished: it submits the job of the recipe's next step.
if [[ $rc == 0 ]] && declare -F stage_finished >/dev/null; then stage_finished; fi
exit "$rc"
