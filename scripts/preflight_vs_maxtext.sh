#!/usr/bin/env bash
# Side by side: MaxText's and our ahead-of-time compile of the same train step, in one
# environment (same jax, same libtpu), alternating the two tools so both see the same
# machine. Prints one line per run: tool, case, compile s, memory GiB, collectives GiB.
#
#   python3.12 -m venv /tmp/vmax && /tmp/vmax/bin/pip install "maxtext[tpu]==0.2.5"
#   /tmp/vmax/bin/pip install --no-deps -e .        # ours, into the same environment
#   PY=/tmp/vmax/bin/python bash scripts/preflight_vs_maxtext.sh [repeats]
#
# CASES="7b" (or "8b", or "mixtral") runs one case only; 7b and 8b by default. mixtral is
# MaxText's published Mixtral-8x7B recipe for v6e-256 (FSDP 256, 32 x 1024 per chip,
# remat full, flash attention) against configs/mixtral-8x7b.yaml; each side takes
# ~15 min on a 2-core machine.
# long runs Llama-3.1-8B on v5p-64 with the length split 16 ways over the context axis
# (fsdp 2 x context 16, 2 sequences, remat full), all_gather and ring, at each length of
# LENGTHS (default "32768 65536 131072"); MaxText's ring needs use_tokamax_splash=True.
# STRATEGIES="ring" (or "all_gather") runs one strategy only.
# TPU_LIBRARY_PATH=/path/to/libtpu.so selects another libtpu for both tools.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-python}"
REPEATS="${1:-1}"
CASES="${CASES:-7b 8b}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
ours() {  # case topology config batch [seq_len [rules]]
    "$PY" -m train.compile --config "configs/$3" --topology "$2" mesh.data=1 mesh.fsdp=-1 \
        mesh.model=1 "sharding.rules=${6:-fsdp}" "train.batch_size=$4" \
        "train.seq_len=${5:-2048}" data.source=synthetic --json /tmp/preflight-ours.json \
        >/dev/null 2>&1
    "$PY" - "$1" <<'PY'
import json, sys
r = json.load(open("/tmp/preflight-ours.json"))
gib = 1024 ** 3
print(f"shardlm  {sys.argv[1]:12s} compile {r['compile_s']:6.1f} s  memory "
      f"{r['memory_per_chip']['total'] / gib:6.2f} GiB  collectives {r['collective_bytes_per_chip'] / gib:8.4f} GiB")
PY
}
ours_cp() {  # case length context_attention
    "$PY" -m train.compile --config configs/llama-8b-128k.yaml --topology v5p-64 \
        "train.seq_len=$2" "model.max_seq_len=$2" "model.context_attention=$3" \
        --json /tmp/preflight-ours.json >/dev/null 2>&1
    "$PY" - "$1" <<'PY'
import json, sys
r = json.load(open("/tmp/preflight-ours.json"))
gib = 1024 ** 3
print(f"shardlm  {sys.argv[1]:12s} compile {r['compile_s']:6.1f} s  memory "
      f"{r['memory_per_chip']['total'] / gib:6.2f} GiB  collectives {r['collective_bytes_per_chip'] / gib:8.4f} GiB")
PY
}
maxtext() {  # case topology model per-device-batch [extra]
    "$PY" scripts/maxtext_preflight.py "compile_topology=$2" compile_topology_num_slices=1 \
        "model_name=$3" "per_device_batch_size=$4" max_target_length=2048 \
        remat_policy=full dataset_type=synthetic "${@:5}" 2>/dev/null |
    sed -n 's/^MAXTEXT //p' | "$PY" -c "
import json, sys
r = json.loads(sys.stdin.read())
print(f\"maxtext  {sys.argv[1]:12s} compile {r['compile_s']:6.1f} s  memory \"
      f\"{r['total_gib']:6.2f} GiB  collectives {r['collectives_gib']:8.4f} GiB\")" "$1"
}
for _ in $(seq "$REPEATS"); do
    if [[ " $CASES " == *" 7b "* ]]; then
        maxtext 7b/v5p-64 v5p-64 llama2-7b 4 attention=dot_product
        ours 7b/v5p-64 v5p-64 llama2-7b.yaml 128
    fi
    if [[ " $CASES " == *" 8b "* ]]; then
        maxtext 8b/v5e-256 v5e-256 llama3.1-8b 2
        ours 8b/v5e-256 v5e-256 llama-8b.yaml 512
    fi
    if [[ " $CASES " == *" long "* ]]; then
        for length in ${LENGTHS:-32768 65536 131072}; do
            for strategy in ${STRATEGIES:-all_gather ring}; do
                extra=()
                [ "$strategy" = ring ] && extra=(context_parallel_strategy=ring use_tokamax_splash=True)
                maxtext "$strategy/$length" v5p-64 llama3.1-8b 0.0625 \
                    "max_target_length=$length" attention=flash ici_fsdp_parallelism=2 \
                    ici_context_parallelism=16 "${extra[@]}"
                ours_cp "$strategy/$length" "$length" "$strategy"
            done
        done
    fi
    if [[ " $CASES " == *" mixtral "* ]]; then
        maxtext mixtral/v6e-256 v6e-256 mixtral-8x7b 32 max_target_length=1024 \
            ici_fsdp_parallelism=-1 attention=flash
        ours mixtral/v6e-256 v6e-256 mixtral-8x7b.yaml 8192 1024 fsdp_ep
    fi
done
