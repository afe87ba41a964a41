#!/usr/bin/env bash
# Shared body of slurm/single_node.sbatch and slurm/multi_node.sbatch (not submitted on its own).
#   launch.sh RECIPE [extra `sdmoe-train fit` arguments...]
# Runs one training task per GPU with srun (Lightning's SLURM environment gives each its rank), forwards
# the pre-timeout signal to the tasks, and makes sure a preempted job comes back:
#  * the tasks save at the next optimizer step, requeue the job themselves and exit 0
#    (sdmoe_train.checkpointing.preemption.PreemptionHandler);
#  * if they died instead (the signal came before Python had installed its handler), this shell requeues.
# The requeued job runs this script again; `fit` resumes from the newest valid checkpoint by itself.
set -uo pipefail

RECIPE=${1:?usage: launch.sh RECIPE [fit arguments...]}
shift
PYTHON=${PYTHON:-python}
signal_received=0
forward_signal() {
    signal_received=1
    echo "[$(date -Is)] batch shell got SIGUSR1: asking the training tasks to save and requeue"
    [ -n "${srun_pid:-}" ] && kill -USR1 "$srun_pid" 2>/dev/null
}
trap forward_signal USR1
# Printed once the trap is set: from this line on a USR1 is never lost.
echo "[$(date -Is)] job ${SLURM_JOB_ID} restart ${SLURM_RESTART_COUNT:-0}: ${SLURM_NNODES} node(s) x" \
    "${SLURM_NTASKS_PER_NODE:-1} task(s), recipe ${RECIPE}"

# Since Slurm 22.05 srun no longer takes --cpus-per-task from the allocation (sbatch(1): "srun will not
# inherit the --cpus-per-task value requested by salloc or sbatch"); without this each task may get one CPU
# for its data-loader workers and threads wherever task binding is enforced.
[ -n "${SLURM_CPUS_PER_TASK:-}" ] && export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"
# srun forwards SIGUSR1 to every task. --kill-on-bad-exit ends the step when one rank dies, so no rank
# waits forever in a collective.
srun --kill-on-bad-exit=1 --ntasks-per-node="${SLURM_NTASKS_PER_NODE:-1}" \
    "$PYTHON" -m sdmoe_train.cli fit --config "$RECIPE" \
    --trainer.num_nodes="${SLURM_NNODES}" --trainer.devices="${SLURM_NTASKS_PER_NODE:-1}" "$@" &
srun_pid=$!
# A signal that came before srun existed was only recorded; pass it on now (Slurm sends it once).
[ "$signal_received" -eq 1 ] && kill -USR1 "$srun_pid" 2>/dev/null
# `wait` returns early whenever the trap runs; keep waiting until srun itself has exited.
while true; do
    wait "$srun_pid"
    status=$?
    kill -0 "$srun_pid" 2>/dev/null || break
done
echo "[$(date -Is)] training step exited with status ${status}"

if [ "$status" -ne 0 ] && [ "$signal_received" -eq 1 ]; then
    echo "[$(date -Is)] the tasks did not requeue the job themselves; requeueing it from the batch shell"
    job="${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}"
    job="${job:-${SLURM_JOB_ID}}"
    # Also submits the job that releases the requeued one from its BeginTime hold; plain requeue if that fails.
    "$PYTHON" -m sdmoe_train.cli requeue "$job" || scontrol requeue "$job"
fi
exit "$status"
