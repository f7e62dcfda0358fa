#!/bin/bash
# One node's share of examples/slurm/pretrain.sbatch (run by srun, one task per node): `accelerate launch`
# with this node's rank and the allocation's sizes.
#
# Slurm signals every process of the step. The training processes handle SIGUSR1 themselves (checkpoint,
# then exit 138); accelerate's launcher (torch elastic) does not, and would die of it and take them down,
# so it is started with SIGUSR1 ignored (inherited as "ignored"; the training processes install their own
# handler). This shell notes the signal and exits 138, which the batch script reads as "preempted, requeue".
set -uo pipefail

preempted=0
trap 'preempted=1' USR1

(trap '' USR1; exec accelerate launch --config_file "$ACCELERATE_CONFIG" \
    --num_machines "$SLURM_JOB_NUM_NODES" --machine_rank "$SLURM_NODEID" \
    --num_processes $((SLURM_JOB_NUM_NODES * PROCESSES_PER_NODE)) \
    --main_process_ip "$MAIN_ADDRESS" --main_process_port "$MAIN_PORT" \
    "$TRAIN_SCRIPT" "$@") &
launcher=$!
# `wait` returns early when a trapped signal arrives: wait again until the launcher has really ended.
wait "$launcher"
status=$?
while kill -0 "$launcher" 2>/dev/null; do
    wait "$launcher"
    status=$?
done
if (( preempted )); then
    exit 138
fi
exit $status
