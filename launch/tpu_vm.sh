#!/usr/bin/env bash
# Train on a Cloud TPU VM or pod slice: create (or reuse) it, install this repository on every
# worker, start `transformer-jax train` on all workers at once, stream worker 0's log, tear down.
#
#   bash experiments/launch/tpu_vm.sh --name NAME --type v5litepod-16 [options] -- --config experiments/X.py [--set ...]
#
# Options:
#   --name NAME          TPU VM name (required)
#   --type TYPE          accelerator type, e.g. v5litepod-8, v5litepod-16, v5p-32, v6e-8, v4-32 (required)
#   --zone ZONE          default: $TPU_ZONE, else us-west4-a
#   --project PROJECT    default: gcloud's configured project
#   --version VERSION    TPU software version (default: chosen from --type)
#   --spot               create a Spot VM (preemptible; the trainer saves on SIGTERM and resumes)
#   --bucket BUCKET      mount gs://BUCKET with gcsfuse on every worker; the run directory goes there
#                        (every host must see the same checkpoints; default: ~/runs on each worker)
#   --jax SPEC           pip requirement for JAX on the workers (default: "jax[tpu]")
#   --keep               do not delete the TPU VM at the end
#   --dry-run            print the commands, run nothing
#
# Everything after `--` goes to `transformer-jax train`. jax.distributed initialises itself
# on every worker of a pod slice (transformer_jax/parallel/mesh.py detects the TPU environment).
set -euo pipefail

usage() { awk 'NR > 1 && !/^#SBATCH/ { if (!/^#/) exit; sub(/^# ?/, ""); print }' "$0"; exit "${1:-0}"; }

NAME="" TYPE="" ZONE="${TPU_ZONE:-us-west4-a}" PROJECT="" VERSION="" SPOT=0 BUCKET="" JAX_SPEC="jax[tpu]"
KEEP=0 DRY_RUN=0 TRAIN_ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) NAME="$2"; shift 2 ;;
    --type) TYPE="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --project) PROJECT="$2"; shift 2 ;;
    --version) VERSION="$2"; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --bucket) BUCKET="$2"; shift 2 ;;
    --jax) JAX_SPEC="$2"; shift 2 ;;
    --keep) KEEP=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    *) echo "tpu_vm.sh: unknown option $1 (train arguments go after --)" >&2; usage 2 ;;
  esac
done
[[ -n "$NAME" && -n "$TYPE" ]] || { echo "tpu_vm.sh: --name and --type are required" >&2; exit 2; }

# Chips per host and the software image, from the accelerator type. v4/v5p names count
# TensorCores (2 per chip); v5e (v5litepod) and v6e names count chips.
GEN="${TYPE%%-*}" COUNT="${TYPE##*-}"
[[ "$COUNT" =~ ^[0-9]+$ ]] || { echo "tpu_vm.sh: cannot read a size from --type $TYPE" >&2; exit 2; }
case "$GEN" in
  v4) CHIPS=$((COUNT / 2)) PER_HOST=4 IMAGE=tpu-ubuntu2204-base ;;
  v5p) CHIPS=$((COUNT / 2)) PER_HOST=4 IMAGE=v2-alpha-tpuv5 ;;
  v5litepod) CHIPS=$COUNT PER_HOST=8 IMAGE=v2-alpha-tpuv5-lite ;;
  v6e) CHIPS=$COUNT PER_HOST=8 IMAGE=v2-alpha-tpuv6e ;;
  *) echo "tpu_vm.sh: unknown TPU generation in --type $TYPE (v4, v5p, v5litepod, v6e)" >&2; exit 2 ;;
esac
if [[ "$GEN" == v5litepod || "$GEN" == v6e ]] && (( CHIPS > 8 )); then PER_HOST=4; fi  # multi-host v5e/v6e: 4 chips per host
WORKERS=$(( CHIPS > PER_HOST ? CHIPS / PER_HOST : 1 ))
VERSION="${VERSION:-$IMAGE}"

GCLOUD=(gcloud compute tpus tpu-vm)
LOC=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && LOC+=(--project="$PROJECT")
REPO="$(cd "$(dirname "$0")/../.." && pwd)"
RUN_NAME="$(basename "${NAME}")"
if [[ -n "$BUCKET" ]]; then RUNS="/mnt/$BUCKET/runs"; else RUNS="\$HOME/runs"; fi
quoted_args=""
for a in "${TRAIN_ARGS[@]}"; do quoted_args+=" $(printf '%q' "$a")"; done

quote() {  # a word as a shell would need it: bare when safe, else in single quotes
  if [[ "$1" =~ ^[A-Za-z0-9_./=:@%+,-]+$ ]]; then printf '%s' "$1"; else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
run() {  # print (copy-pastable), then run unless --dry-run
  local line="+" word
  for word in "$@"; do line+=" $(quote "$word")"; done
  echo "$line"
  if [[ $DRY_RUN -eq 0 ]]; then "$@"; fi
}
on_all() { run "${GCLOUD[@]}" ssh "$NAME" "${LOC[@]}" --worker=all --command="$1"; }

echo "# TPU $TYPE: $CHIPS chips, $WORKERS worker(s), image $VERSION, zone $ZONE"

# 1. Create the VM / pod slice, or reuse it.
if [[ $DRY_RUN -eq 1 ]]; then
  echo "# reuse $NAME if this succeeds:"
  run "${GCLOUD[@]}" describe "$NAME" "${LOC[@]}" --format=value\(state\)
  echo "# else create it:"
  CREATE=1
elif "${GCLOUD[@]}" describe "$NAME" "${LOC[@]}" --format='value(state)' >/dev/null 2>&1; then
  echo "# reusing $NAME"; CREATE=0
else
  CREATE=1
fi
if [[ $CREATE -eq 1 ]]; then
  create=("${GCLOUD[@]}" create "$NAME" "${LOC[@]}" --accelerator-type="$TYPE" --version="$VERSION")
  [[ $SPOT -eq 1 ]] && create+=(--spot)
  run "${create[@]}"
fi

# 2. Install this repository (its tracked files as they are now) on every worker.
TARBALL="/tmp/transformer_jax_src.tar.gz"
if [[ $DRY_RUN -eq 1 ]]; then
  echo "+ (cd $REPO && git ls-files -z | tar --null -czf $TARBALL -T -)"
else
  (cd "$REPO" && git ls-files -z | tar --null -czf "$TARBALL" -T -)
fi
run "${GCLOUD[@]}" scp "$TARBALL" "$NAME:~/transformer_jax_src.tar.gz" "${LOC[@]}" --worker=all
on_all "set -e; mkdir -p ~/transformer_jax && tar -xzf ~/transformer_jax_src.tar.gz -C ~/transformer_jax \
&& python3 -m venv ~/tjax && ~/tjax/bin/pip install -q -U pip && ~/tjax/bin/pip install -q '$JAX_SPEC' \
&& ~/tjax/bin/pip install -q -e ~/transformer_jax"
if [[ -n "$BUCKET" ]]; then
  on_all "set -e; (command -v gcsfuse || (sudo apt-get update -q && sudo apt-get install -y -q gcsfuse)) >/dev/null; \
sudo mkdir -p /mnt/$BUCKET && sudo chown \$USER /mnt/$BUCKET && (mountpoint -q /mnt/$BUCKET || gcsfuse --implicit-dirs $BUCKET /mnt/$BUCKET)"
fi

# 3. Start the run on all workers at once (detached, so a dropped ssh does not kill it) ...
on_all "cd ~/transformer_jax && mkdir -p $RUNS && nohup ~/tjax/bin/transformer-jax train$quoted_args \
--workdir $RUNS/$RUN_NAME > ~/train.log 2>&1 & echo \$! > ~/train.pid"
# ... and stream worker 0's log until its trainer exits (Ctrl-C stops only the streaming).
run "${GCLOUD[@]}" ssh "$NAME" "${LOC[@]}" --worker=0 --command="tail -n +1 -F ~/train.log --pid=\$(cat ~/train.pid)"

# 4. Tear down.
if [[ $KEEP -eq 0 ]]; then
  run "${GCLOUD[@]}" delete "$NAME" "${LOC[@]}" --quiet
else
  echo "# kept $NAME; delete it with: ${GCLOUD[*]} delete $NAME ${LOC[*]} --quiet"
fi
