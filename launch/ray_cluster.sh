#!/usr/bin/env bash
# Start (or join) a Ray cluster on this node.
#   launch/ray_cluster.sh head                 # on the head node; prints the address to join
#   launch/ray_cluster.sh worker HEAD_IP:6379  # on every other node
# Then run the job on the head node (or submit it: `ray job submit --address http://HEAD_IP:8265 -- CMD`).
set -euo pipefail
role=${1:?usage: ray_cluster.sh head|worker [HEAD_ADDRESS]}
port=${RAY_PORT:-6379}
case "$role" in
  head)
    ray start --head --port="$port" --dashboard-host=0.0.0.0 --num-gpus="${NUM_GPUS:-$(nvidia-smi -L 2>/dev/null | wc -l)}"
    echo "joined nodes use: launch/ray_cluster.sh worker $(hostname -I | awk '{print $1}'):$port"
    ;;
  worker)
    address=${2:?worker needs the head address HOST:PORT}
    ray start --address="$address" --num-gpus="${NUM_GPUS:-$(nvidia-smi -L 2>/dev/null | wc -l)}" --block
    ;;
  *) echo "unknown role '$role': allowed values are head, worker" >&2; exit 2 ;;
esac
