#!/usr/bin/env bash
# Train on a multi-host Cloud TPU VM slice (e.g. v5p-64 = 8 hosts): the same command on
# every worker. jax.distributed starts by itself there (TPU_WORKER_HOSTNAMES lists the
# hosts), each host reads its own rows of every batch, process 0 logs and writes metrics.
# Checkpoints must go to storage every host sees: gs://.
#
#   scripts/launch/tpu_vm.sh my-tpu us-east5-a configs/llama2-7b.yaml gs://bucket/runs/7b
#
# Not run in this project's CI (no TPU here); check the plan first on a CPU with
#   python -m train.compile --config CONFIG --topology v5p-64
set -euo pipefail
NAME="$1" ZONE="$2" CONFIG="$3" OUT="$4"; shift 4
REPO="${REPO:-https://github.com/your-org/shardlm.git}"

# 1) code and dependencies on every worker (gcsfs for gs:// checkpoints)
gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker=all --command "
  set -e; [ -d shardlm ] || git clone $REPO shardlm
  cd shardlm && git pull --ff-only && pip install -q -e '.[gcs]' 'jax[tpu]'"

# 2) the run, on all workers at once; rerunning the same line resumes from the latest
#    checkpoint (after a preemption, a crash or a maintenance event)
gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker=all --command "
  cd shardlm && python -m train --config $CONFIG output_dir=$OUT $*"
