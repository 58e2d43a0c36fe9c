#!/usr/bin/env bash
# Run one rd_jax command as an xpk workload on a GKE TPU cluster (every pod
# of the slice(s) runs the same command; JAX finds its peers from the
# environment xpk sets up).
#
#   launch/xpk.sh CLUSTER TPU_TYPE NUM_SLICES -- python -m rd_jax.train_rm \
#       --config=configs/rm_shapes.py:size=26b --workdir=gs://BUCKET/rm26b
#
# TPU_TYPE as xpk spells it (v5p-128, v5litepod-256, v6e-256). Optional env:
# PROJECT, ZONE, WORKLOAD (name; default rd-jax-<user>-<time>), IMAGE (base
# image; default python:3.11-slim). xpk builds an image from this checkout
# (--script-dir), installs requirements + jax[tpu] in it, and runs the
# command. With NUM_SLICES > 1 (multi-slice over DCN) give the mesh's DCN
# sizes in the config (mesh.dcn_shape, e.g. (-1, 1, 1): data across slices).
set -euo pipefail
[[ $# -ge 4 ]] || { sed -n '2,16p' "$0"; exit 1; }
cluster=$1; tpu_type=$2; slices=$3; shift 3
[[ $1 == -- ]] && shift
repo_root=$(cd "$(dirname "$0")/.." && pwd)
workload=${WORKLOAD:-rd-jax-${USER:-user}-$(date +%m%d-%H%M%S)}
jax_version=$(python -c "import jax; print(jax.__version__)")
cmd=$(printf '%q ' "$@")

xpk workload create \
    --cluster="$cluster" ${PROJECT:+--project=$PROJECT} ${ZONE:+--zone=$ZONE} \
    --workload="$workload" --tpu-type="$tpu_type" --num-slices="$slices" \
    --base-docker-image="${IMAGE:-python:3.11-slim}" \
    --script-dir="$repo_root" \
    --command="pip install -q -r requirements.txt 'jax[tpu]==$jax_version' \
-f https://storage.googleapis.com/jax-releases/libtpu_releases.html && \
unset JAX_PLATFORMS && export RD_JAX_DISTRIBUTED=1 TF_CPP_MIN_LOG_LEVEL=3 && $cmd"
echo "workload $workload: xpk workload list --cluster=$cluster"
