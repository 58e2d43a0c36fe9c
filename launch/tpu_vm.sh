#!/usr/bin/env bash
# Run one rd_jax command on every worker of a Cloud TPU VM slice (same
# command on all hosts; JAX finds its peers from the TPU metadata).
#
#   launch/tpu_vm.sh setup TPU_NAME ZONE      # copy this checkout, install
#   launch/tpu_vm.sh run   TPU_NAME ZONE -- python -m rd_jax.train_rm \
#       --config=configs/rm_shapes.py:size=8b --workdir=gs://BUCKET/rm8b
#   launch/tpu_vm.sh aot   v5p-128 -- --config=configs/rm_shapes.py:size=26b
#                                             # (local: compile, no TPU needed)
#
# Optional env: PROJECT (gcloud project), RD_JAX_DIR (remote checkout,
# default ~/rd_jax). Create the slice first, e.g.
#   gcloud compute tpus tpu-vm create NAME --zone=us-east5-a \
#       --accelerator-type=v5p-128 --version=v2-alpha-tpuv5
# Workdirs should be on GCS (gs://...): every host writes its checkpoint
# shards there (Orbax) and host 0 writes metrics and final_metrics.json.
set -euo pipefail

usage() { sed -n '2,20p' "$0"; exit 1; }
[[ $# -ge 2 ]] || usage
mode=$1; shift
repo_root=$(cd "$(dirname "$0")/.." && pwd)
remote_dir=${RD_JAX_DIR:-rd_jax}
project_flag=${PROJECT:+--project=$PROJECT}

if [[ $mode == aot ]]; then
  topology=$1; shift; [[ ${1:-} == -- ]] && shift
  cd "$repo_root"
  exec env JAX_PLATFORMS=cpu python -m rd_jax.aot --topology="$topology" "$@"
fi

[[ $# -ge 2 ]] || usage
tpu=$1; zone=$2; shift 2
[[ ${1:-} == -- ]] && shift
ssh_all() {
  gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" $project_flag \
      --worker=all --command="$1"
}

case $mode in
  setup)
    # Ship exactly the tracked files of this checkout (no venvs, no data).
    tarball=$(mktemp --suffix=.tar.gz)
    git -C "$repo_root" ls-files -z | tar -C "$repo_root" --null -T - -czf "$tarball"
    gcloud compute tpus tpu-vm scp "$tarball" "$tpu:/tmp/rd_jax.tar.gz" \
        --zone="$zone" $project_flag --worker=all
    rm -f "$tarball"
    jax_version=$(python -c "import jax; print(jax.__version__)")
    ssh_all "set -e; mkdir -p $remote_dir && tar -C $remote_dir -xzf /tmp/rd_jax.tar.gz
      cd $remote_dir && python3 -m venv .venv && . .venv/bin/activate
      pip install -q -r requirements.txt 'jax[tpu]==$jax_version' \
          -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
    ;;
  run)
    [[ $# -ge 1 ]] || usage
    # JAX_PLATFORMS unset: use the TPU. RD_JAX_DISTRIBUTED=1: entry points
    # call jax.distributed.initialize() (auto-detected on TPU VMs).
    cmd=$(printf '%q ' "$@")
    ssh_all "cd $remote_dir && . .venv/bin/activate && unset JAX_PLATFORMS &&
      export RD_JAX_DISTRIBUTED=1 TF_CPP_MIN_LOG_LEVEL=3 &&
      $cmd 2>&1 | tee -a /tmp/rd_jax_\$(hostname).log"
    ;;
  *) usage ;;
esac
