#!/usr/bin/env bash
# Rebound on machines started by hand: one Dask scheduler, one Dask worker per GPU.
#
#   head$   deployments/clusters/machines.sh scheduler
#   node$   deployments/clusters/machines.sh worker tcp://HEAD:8786 [GPUS]   # on every node
#   head$   python -m flows.train --cluster tcp://HEAD:8786 --workers 2 --spares 1 \
#               --device cuda --threads 8 --store s3://bucket/runs    # see multi-machine.md
#
# Every machine: the same checkout at the same path with its .venv (tasks.preload must
# import), and the store reachable. IFACE (optional) names the network interface the machines
# reach each other on; set it on multi-NIC hosts (gloo and NCCL otherwise pick one themselves).
set -euo pipefail
cd "$(dirname "$0")/../.."
DASK=${DASK:-.venv/bin/dask}
IFACE=${IFACE:-}
iface_args=()
if [[ -n $IFACE ]]; then
    iface_args=(--interface "$IFACE")
    export GLOO_SOCKET_IFNAME=$IFACE NCCL_SOCKET_IFNAME=$IFACE
fi

case ${1:-} in
scheduler)
    # Rebound's scheduler settings (flows/cluster.py DASK_SETTINGS): a batch group is
    # sequential state and never stolen; a worker silent for 60 s is dead.
    export DASK_DISTRIBUTED__SCHEDULER__WORK_STEALING=False
    export DASK_DISTRIBUTED__SCHEDULER__WORKER_TTL=60s
    export DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES=3
    exec "$DASK" scheduler --port 8786 --dashboard-address :8787 "${iface_args[@]}"
    ;;
worker)
    address=${2:?usage: $0 worker tcp://HEAD:8786 [GPUS]}
    gpus=${3:-0}
    export DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED=False
    # One thread per worker (one batch group or rank at a time); the preload warms torch and
    # probes the device. A nanny restarts a worker process that dies.
    common=(--nthreads 1 --nworkers 1 --preload tasks.preload "${iface_args[@]}")
    if [[ $gpus -eq 0 ]]; then
        exec "$DASK" worker "$address" "${common[@]}"
    fi
    for ((gpu = 0; gpu < gpus; gpu++)); do
        # One GPU each, offered as the GPU resource Rebound's tasks ask for on CUDA.
        CUDA_VISIBLE_DEVICES=$gpu "$DASK" worker "$address" "${common[@]}" \
            --resources GPU=1 --name "$(hostname)-gpu$gpu" &
    done
    wait
    ;;
*)
    echo "usage: $0 scheduler | worker tcp://HEAD:8786 [GPUS]" >&2
    exit 2
    ;;
esac
