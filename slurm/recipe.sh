#!/usr/bin/env bash
# A recipe (`megatron-rl recipe`'s YAML: stages and filter steps in order) as a chain of jobs, one per step,
# submitted from the repo root:
#
#   MODEL_PATH=/ckpt/R1-Distill-7B MATH_DATA=/data/math.jsonl CODE_DATA=/data/code.jsonl \
#       sbatch slurm/recipe.sh configs/recipe_acereason_7b.yaml
#   sbatch --nodes=1 --ntasks-per-node=2 --gpus-per-node=0 slurm/recipe.sh configs/recipe_tiny.yaml run.steps=10
#
# Each job runs the recipe's next step that has not finished (megatron_rl/recipe.py decides, as
# `megatron-rl recipe --resume` would): a stage through slurm/common.sh (one trainer rank per task with srun, its
# model, data and run name given by the steps before it; USR1 before the time limit checkpoints it and requeues
# the job, which resumes the stage from that checkpoint), a filter as one task (`megatron-rl recipe --step NAME`;
# USR1 requeues the job, which runs the filter again). Once its step has finished the job submits the job of the
# next step (sbatch --dependency=afterok on itself) with its own job name, nodes, tasks per node, CPUs and GPUs,
# partition, account and time limit, its output next to this job's; after the last step it prints the
# recipe's summary line (also written to OUTPUT_DIR/<recipe name>/result.json). A finished step is never run
# again: submitting the script again continues a chain that stopped (a failed step is run again, a stage from
# its latest checkpoint).
#
# Machines: the sbatch options, as for slurm/math_stage.sh (the #SBATCH lines below are the defaults); every job
# of the chain gets those of the first.
# Settings (environment variables, all optional):
#   OUTPUT_DIR      runs                         -> run.output_dir of every step; the recipe's runs are
#                                                OUTPUT_DIR/<recipe name>/<step name>
#   LOG_DIR         $OUTPUT_DIR/logs             each job's log: LOG_DIR/<job name>-<job id>.out
#   PYTHON          .venv/bin/python or python3  the environment with megatron-rl installed
#   ROLLOUT_PLACEMENT, ENGINE_NODES, SRUN_WAIT   as for slurm/math_stage.sh, for every stage
#   REPO_DIR        the submit directory         where slurm/common.sh and relative paths are found
#   and the variables the recipe file reads (${VAR} in its model: and data:, e.g. MODEL_PATH).
# Arguments: the recipe file (relative paths are from the repo root), then dotted overrides (key=value) for
# every stage.
#SBATCH --job-name=mrl-recipe
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

set -euo pipefail

REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
die() {
	echo "error: $*" >&2
	exit 2
}
[[ -f $REPO_DIR/slurm/common.sh ]] || die "$REPO_DIR/slurm/common.sh not found: submit from the repository root or set REPO_DIR"
[[ -n ${SLURM_JOB_ID:-} ]] || die "not inside a Slurm job (SLURM_JOB_ID is unset): submit with 'sbatch slurm/recipe.sh RECIPE.yaml'"
(($# >= 1)) || die "usage: sbatch slurm/recipe.sh RECIPE.yaml [key=value ...]"
RECIPE=$1
shift
recipe_args=("$@")

cd "$REPO_DIR"
[[ -f $RECIPE ]] || die "recipe file $RECIPE does not exist (relative paths are from $REPO_DIR)"
OUTPUT_DIR=${OUTPUT_DIR:-runs}
LOG_DIR=${LOG_DIR:-$OUTPUT_DIR/logs}
if [[ -z ${PYTHON:-} ]]; then
	if [[ -x $REPO_DIR/.venv/bin/python ]]; then PYTHON=$REPO_DIR/.venv/bin/python; else PYTHON=python3; fi
fi
command -v "$PYTHON" >/dev/null 2>&1 || die "PYTHON=$PYTHON is not an executable (set PYTHON to the environment's python)"
recipe_overrides=("run.output_dir=$OUTPUT_DIR" "$@")

# The recipe's next unfinished step: next_kind (stage, filter or done), next_name, next_domain (math or code),
# next_config and next_overrides (a stage's trainer command); summary (the summary line, when done).
plan_next() {
	local out line
	out=$("$PYTHON" - "$RECIPE" "${recipe_overrides[@]}" <<'PY'
import json
import sys
from pathlib import Path

from megatron_rl.config import ConfigError
from megatron_rl.recipe import RecipeRun

try:
    run = RecipeRun(Path(sys.argv[1]), sys.argv[2:], resume=True)
    step = run.next_step()
    if step is None:
        print("@done", json.dumps(run.summary()))
        sys.exit()
except ConfigError as e:
    sys.exit(f"error: {e}")
fields = [step.config, *step.overrides] if step.kind == "stage" else []
if any("\n" in f for f in fields):
    sys.exit(f"error: a config path or override of step '{step.name}' holds a line break")
print("@step", step.kind, step.domain or "-", "resumed" if step.started else "new", step.name)
print("@config", step.config)
for override in step.overrides:
    print("@override", override)
PY
	) || exit 2
	next_kind="" next_name="" next_domain="" next_state="" next_config="" next_overrides=() summary=""
	while IFS= read -r line; do
		case $line in
		"@step "*) read -r next_kind next_domain next_state next_name <<<"${line#@step }" ;;
		"@config "*) next_config=${line#@config } ;;
		"@override "*) next_overrides+=("${line#@override }") ;;
		"@done "*) next_kind="done" summary=${line#@done } ;;
		*) echo "$line" ;;
		esac
	done <<<"$out"
}

# The job of the next step, with this job's resources, after this one has completed (afterok). The batch
# script's SLURM_* variables (SLURM_CONF aside) and the trainer's rendezvous stay out of the new job.
submit_next() {
	local opts=(--parsable --dependency="afterok:$SLURM_JOB_ID" --job-name="${SLURM_JOB_NAME:-mrl-recipe}")
	local nodes=${SLURM_JOB_NUM_NODES:-1}
	opts+=(--nodes="$nodes" --ntasks-per-node="${SLURM_NTASKS_PER_NODE:-$((${SLURM_NTASKS:-$nodes} / nodes))}")
	[[ -z ${SLURM_CPUS_PER_TASK:-} ]] || opts+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
	[[ -z ${SLURM_GPUS_PER_NODE:-} ]] || opts+=(--gpus-per-node="$SLURM_GPUS_PER_NODE")
	[[ -z ${SLURM_JOB_PARTITION:-} ]] || opts+=(--partition="$SLURM_JOB_PARTITION")
	[[ -z ${SLURM_JOB_ACCOUNT:-} ]] || opts+=(--account="$SLURM_JOB_ACCOUNT")
	local limit stdout
	limit=$(squeue --noheader --jobs="$SLURM_JOB_ID" --format=%l) || limit=""
	[[ $limit != *[0-9]* ]] || opts+=(--time="$limit")
	stdout=$(scontrol show job -o "$SLURM_JOB_ID" | grep -o 'StdOut=[^ ]*') || stdout=""
	[[ -z $stdout ]] || opts+=(--output="$(dirname "${stdout#StdOut=}")/%x-%j.out")
	local clean=(-u MASTER_ADDR -u MASTER_PORT -u MEGATRON_RL_STOP_FILE) var job
	while IFS= read -r var; do
		[[ -z $var || $var == SLURM_CONF ]] || clean+=(-u "$var")
	done < <(compgen -e SLURM_ || true)
	job=$(env "${clean[@]}" sbatch "${opts[@]}" "$REPO_DIR/slurm/recipe.sh" "$RECIPE" "${recipe_args[@]}") ||
		die "sbatch of the next step's job failed: submit 'sbatch slurm/recipe.sh $RECIPE' again to continue"
	echo "[$(date '+%F %T')] recipe $RECIPE: submitted job ${job%%;*} for step $next_kind '$next_name' (after job $SLURM_JOB_ID)"
}

# After this job's step: the next step's job, or the summary when the recipe is done. A step that exited 0 and
# left no result (result.json, report.json) would be submitted again and again: that is an error instead.
# shellcheck disable=SC2317 # called by slurm/common.sh and below
stage_finished() {
	local ran=$next_name
	plan_next
	if [[ $next_kind == "done" ]]; then
		echo "[$(date '+%F %T')] recipe $RECIPE: every step has finished"
		echo "$summary"
	elif [[ $next_name == "$ran" ]]; then
		die "step '$ran' exited with code 0 but did not finish (no result file in its directory): not submitting it again"
	else
		submit_next
	fi
}

plan_next
case $next_kind in
done)
	echo "recipe $RECIPE: every step has finished (nothing to run)"
	echo "$summary"
	exit 0
	;;
stage)
	echo "recipe $RECIPE: stage '$next_name' ($next_state)"
	STAGE=$next_domain
	DEFAULT_CONFIG=$next_config
	CONFIG=$next_config
	set -- "${next_overrides[@]}"
	# shellcheck source=slurm/common.sh
	source "$REPO_DIR/slurm/common.sh"
	;;
filter) ;;
*) die "unexpected next step '$next_kind' of $RECIPE" ;;
esac

# A filter step: one task. It writes its report only at its end, so a requeued job runs it again from the start.
mkdir -p "$OUTPUT_DIR" "$LOG_DIR"
LOG_FILE=$LOG_DIR/${SLURM_JOB_NAME:-recipe}-$SLURM_JOB_ID.out
echo "megatron-rl recipe: filter '$next_name', job $SLURM_JOB_ID, log $LOG_FILE"
exec >>"$LOG_FILE" 2>&1
echo "[$(date '+%F %T')] job $SLURM_JOB_ID (${SLURM_JOB_NAME:-}) restart ${SLURM_RESTART_COUNT:-0}: filter '$next_name' of $RECIPE"
# shellcheck disable=SC2317 # called by the trap below
requeue_filter() {
	interrupted=1
	echo "[$(date '+%F %T')] batch script: SIGUSR1, requeueing job $SLURM_JOB_ID; it runs the filter again"
	scontrol requeue "$SLURM_JOB_ID"
}
trap requeue_filter USR1
cmd=("$PYTHON" -m megatron_rl.cli recipe "$RECIPE" --step "$next_name" "${recipe_overrides[@]}")
echo "[$(date '+%F %T')] ${cmd[*]}"
srun --nodes=1 --ntasks=1 "${cmd[@]}" &
srun_pid=$!
while :; do
	interrupted=""
	rc=0
	wait "$srun_pid" || rc=$?
	[[ -n $interrupted && $rc -gt 128 ]] || break
done
echo "[$(date '+%F %T')] filter exited with code $rc"
if [[ $rc == 0 ]]; then stage_finished; fi
exit "$rc"
