#!/usr/bin/env bash
# Several TPU slices joined over the data-center network (DCN), through a queued resource
# with --node-count. The mesh puts only the data axis across slices: mesh.dcn_data=SLICES
# (gradients cross DCN once per step; FSDP and tensor-parallel traffic stays on ICI).
# jax.distributed starts by itself (MEGASCALE_COORDINATOR_ADDRESS is set on every host).
#
#   scripts/launch/multislice.sh my-qr us-east5-a v5p-64 2 configs/llama2-7b.yaml gs://bucket/runs/7b
#
# Not run here (no TPU). Check it on a CPU first:
#   python -m train.compile --config CONFIG --topology v5p-64 --slices 2 mesh.data=2 mesh.dcn_data=2
set -euo pipefail
QR="$1" ZONE="$2" TYPE="$3" SLICES="$4" CONFIG="$5" OUT="$6"; shift 6
REPO="${REPO:-https://github.com/your-org/shardlm.git}"

gcloud compute tpus queued-resources create "$QR" --zone "$ZONE" \
  --accelerator-type "$TYPE" --runtime-version v2-alpha-tpuv5 --node-count "$SLICES" \
  --node-prefix "$QR"
# ... wait until `gcloud compute tpus queued-resources describe $QR` says ACTIVE, then:
for i in $(seq 0 $((SLICES - 1))); do
  gcloud compute tpus tpu-vm ssh "$QR-$i" --zone "$ZONE" --worker=all --command "
    set -e; [ -d shardlm ] || git clone $REPO shardlm
    cd shardlm && pip install -q -e '.[gcs]' 'jax[tpu]'
    nohup python -m train --config $CONFIG output_dir=$OUT mesh.data=$SLICES \
      mesh.dcn_data=$SLICES mesh.fsdp=-1 $* > train.log 2>&1 &" &
done
wait
