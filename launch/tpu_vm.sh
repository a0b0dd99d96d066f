#!/usr/bin/env bash
# Train on a Cloud TPU VM or pod slice: create (or reuse) it, install this checkout on every
# worker with pinned versions, start `transformer-jax train` on all workers at once, follow
# every worker's log, recreate a preempted Spot VM and resume from the bucket, tear down.
#
#   bash launch/tpu_vm.sh --name NAME --type v5litepod-16 [options] -- --config NAME [--set ...]
#
# Options:
#   --name NAME          TPU VM name (required)
#   --type TYPE          accelerator type, e.g. v5litepod-8, v5litepod-16, v5p-32, v6e-8, v4-32 (required)
#   --zone ZONE          default: $TPU_ZONE, else us-west4-a
#   --project PROJECT    default: gcloud's configured project
#   --version VERSION    TPU software version (default: chosen from --type)
#   --spot               a Spot VM (preemptible: the trainer saves on SIGTERM; see --max-restarts)
#   --queued             create through a queued resource (waits for capacity instead of failing)
#   --max-restarts N     recreate a preempted VM and resume up to N times (default 0)
#   --bucket BUCKET      mount gs://BUCKET with gcsfuse on every worker and keep the run directory
#                        there (all hosts see one checkpoint; it outlives the VM). Needed to resume
#                        after a preemption; without it the run is in ~/runs on each worker
#   --python VERSION     the workers' Python, installed by uv (default 3.11)
#   --logs DIR           where every worker's log is copied (default: tpu-logs/NAME)
#   --keep               do not delete the TPU VM at the end
#   --dry-run            print the commands, run nothing
#
# Everything after `--` goes to `transformer-jax train`. jax.distributed initialises itself
# on every worker of a pod slice (transformer_jax/parallel/mesh.py detects the TPU environment).
set -euo pipefail

usage() { awk 'NR > 1 { if (!/^#/) exit; sub(/^# ?/, ""); print }' "$0"; exit "${1:-0}"; }
die() { echo "tpu_vm.sh: $*" >&2; exit 2; }

NAME="" TYPE="" ZONE="${TPU_ZONE:-us-west4-a}" PROJECT="" VERSION="" SPOT=0 QUEUED=0 MAX_RESTARTS=0 BUCKET=""
PYTHON=3.11 LOGS="" KEEP=0 DRY_RUN=0 TRAIN_ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) NAME="$2"; shift 2 ;;
    --type) TYPE="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --project) PROJECT="$2"; shift 2 ;;
    --version) VERSION="$2"; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --queued) QUEUED=1; shift ;;
    --max-restarts) MAX_RESTARTS="$2"; shift 2 ;;
    --bucket) BUCKET="${2#gs://}"; BUCKET="${BUCKET%/}"; shift 2 ;;
    --python) PYTHON="$2"; shift 2 ;;
    --logs) LOGS="$2"; shift 2 ;;
    --keep) KEEP=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    *) die "unknown option $1 (train arguments go after --)" ;;
  esac
done
[[ -n "$NAME" && -n "$TYPE" ]] || die "--name and --type are required"
[[ "$MAX_RESTARTS" =~ ^[0-9]+$ ]] || die "--max-restarts $MAX_RESTARTS must be a whole number"
[[ $MAX_RESTARTS -eq 0 || -n "$BUCKET" ]] || die "--max-restarts needs --bucket: a recreated VM resumes from the bucket"

# Chips per host and the software image, from the accelerator type. v4/v5p names count
# TensorCores (2 per chip); v5e (v5litepod) and v6e names count chips.
GEN="${TYPE%%-*}" COUNT="${TYPE##*-}"
[[ "$COUNT" =~ ^[0-9]+$ ]] || die "cannot read a size from --type $TYPE"
case "$GEN" in
  v4) CHIPS=$((COUNT / 2)) PER_HOST=4 IMAGE=tpu-ubuntu2204-base ;;
  v5p) CHIPS=$((COUNT / 2)) PER_HOST=4 IMAGE=v2-alpha-tpuv5 ;;
  v5litepod) CHIPS=$COUNT PER_HOST=8 IMAGE=v2-alpha-tpuv5-lite ;;
  v6e) CHIPS=$COUNT PER_HOST=8 IMAGE=v2-alpha-tpuv6e ;;
  *) die "unknown TPU generation in --type $TYPE (v4, v5p, v5litepod, v6e)" ;;
esac
if [[ "$GEN" == v5litepod || "$GEN" == v6e ]] && (( CHIPS > 8 )); then PER_HOST=4; fi  # multi-host v5e/v6e: 4 chips per host
WORKERS=$(( CHIPS > PER_HOST ? CHIPS / PER_HOST : 1 ))
VERSION="${VERSION:-$IMAGE}"
LOGS="${LOGS:-tpu-logs/$NAME}"

REPO="$(cd "$(dirname "$0")/.." && pwd)"
TPU=(gcloud compute tpus tpu-vm)
QR=(gcloud compute tpus queued-resources)
LOC=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && LOC+=(--project="$PROJECT")
if [[ -n "$BUCKET" ]]; then RUNS="/mnt/$BUCKET/runs"; else RUNS="\$HOME/runs"; fi

quote() {  # a word as a shell would need it: bare when safe, else in single quotes
  if [[ "$1" =~ ^[A-Za-z0-9_./=:@%+,-]+$ ]]; then printf '%s' "$1"; else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
show() { local line="+" word; for word in "$@"; do line+=" $(quote "$word")"; done; echo "$line"; }
run() { show "$@"; if [[ $DRY_RUN -eq 0 ]]; then "$@"; fi; }  # print (copy-pastable), then run unless --dry-run
on_all() { run "${TPU[@]}" ssh "$NAME" "${LOC[@]}" --worker=all --command="$1"; }

# -- What reaches the workers: tracked files plus untracked ones git does not ignore (a new
# experiment file included); a --config file that would not be among them is refused by name.
mapfile -d '' SHIPPED < <(cd "$REPO" && git ls-files -z --cached --others --exclude-standard)
for ((i = 0; i < ${#TRAIN_ARGS[@]}; i++)); do
  [[ "${TRAIN_ARGS[i]}" == --config && $((i + 1)) -lt ${#TRAIN_ARGS[@]} ]] || continue
  cfg="${TRAIN_ARGS[i + 1]}"
  [[ "$cfg" == *.py || "$cfg" == */* ]] || continue  # a shipped experiment's name
  rel="$(realpath -m --relative-to="$REPO" "$cfg")"
  printf '%s\n' "${SHIPPED[@]}" | grep -qxF -- "$rel" ||
    die "--config $cfg is not in this checkout (or git ignores it), so the workers would not get it; move it into $REPO"
  TRAIN_ARGS[i + 1]="$rel"  # workers run from the checkout's copy
done
UNTRACKED="$(cd "$REPO" && git ls-files --others --exclude-standard | tr '\n' ' ')"

# -- Remote steps (each one shell command line, run by ssh on the workers).
UV="\$HOME/.local/bin/uv" UV_VERSION=0.13.9
INSTALL="set -e; rm -rf ~/transformer_jax && mkdir -p ~/transformer_jax \
&& tar -xzf ~/transformer_jax_src.tar.gz -C ~/transformer_jax; \
test -x $UV || curl -LsSf https://astral.sh/uv/$UV_VERSION/install.sh | sh; \
$UV venv -q --allow-existing --python $PYTHON ~/tjax \
&& $UV pip sync -q --python ~/tjax/bin/python ~/transformer_jax/launch/requirements-tpu.txt \
&& $UV pip install -q --python ~/tjax/bin/python --no-deps --reinstall-package transformer-jax ~/transformer_jax"
APT="sudo apt-get -q -o DPkg::Lock::Timeout=600"  # a fresh VM runs unattended-upgrades at boot
GCSFUSE="set -e; if ! command -v gcsfuse >/dev/null; then \
echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -c -s) main\" \
| sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null \
&& curl -fsS https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null \
&& $APT update && $APT install -y gcsfuse; fi; \
sudo mkdir -p /mnt/$BUCKET && sudo chown \$USER /mnt/$BUCKET; \
mountpoint -q /mnt/$BUCKET || gcsfuse --implicit-dirs --rename-dir-limit=200000 --metadata-cache-ttl-secs=0 $BUCKET /mnt/$BUCKET"
# Start detached (a dropped ssh does not stop it); a run left over from an earlier launch is
# stopped first (SIGTERM: it saves), and the TPU's lock file removed, as MaxText does.
quoted_args=""
for a in "${TRAIN_ARGS[@]}"; do quoted_args+=" $(printf '%q' "$a")"; done
START="cd ~/transformer_jax && if test -f ~/train.pid && kill \$(cat ~/train.pid) 2>/dev/null; then \
tail --pid=\$(cat ~/train.pid) -f /dev/null; fi; sudo rm -f /tmp/libtpu_lockfile; rm -f ~/train.exit; mkdir -p $RUNS; \
(trap '' HUP; ~/tjax/bin/transformer-jax train$quoted_args --workdir $RUNS/$NAME & echo \$! > ~/train.pid; \
wait \$!; echo \$? > ~/train.exit) > ~/train.log 2>&1 < /dev/null &"
# Follow one worker's log until its trainer exits; ssh's status is the trainer's, except 253:
# it saved and stopped on a signal (a preemption's SIGTERM), so the run is not finished; 254: no
# status (the worker went away).
FOLLOW="sleep 2; tail -n +1 -F ~/train.log --pid=\$(cat ~/train.pid) 2>/dev/null; \
for i in 1 2 3 4 5; do if test -f ~/train.exit; then c=\$(cat ~/train.exit); \
if test \"\$c\" = 0 && grep -q 'stopped by SIG' ~/train.log; then exit 253; fi; exit \$c; fi; sleep 1; done; exit 254"

# -- The VM: reuse a READY one, wait for one on its way, recreate a preempted or broken one.
create_vm() {
  if [[ $QUEUED -eq 1 ]]; then
    local create=("${QR[@]}" create "$NAME" "${LOC[@]}" --node-id="$NAME" --accelerator-type="$TYPE" --runtime-version="$VERSION")
  else
    local create=("${TPU[@]}" create "$NAME" "${LOC[@]}" --accelerator-type="$TYPE" --version="$VERSION")
  fi
  [[ $SPOT -eq 1 ]] && create+=(--spot)
  run "${create[@]}"
}
delete_vm() {
  if [[ $QUEUED -eq 1 ]]; then run "${QR[@]}" delete "$NAME" "${LOC[@]}" --force --quiet
  else run "${TPU[@]}" delete "$NAME" "${LOC[@]}" --quiet; fi
}
vm_state() {  # the node's state (a queued resource's, with --queued); empty when there is none
  if [[ $QUEUED -eq 1 ]]; then "${QR[@]}" describe "$NAME" "${LOC[@]}" --format='value(state.state)' 2>/dev/null || true
  else "${TPU[@]}" describe "$NAME" "${LOC[@]}" --format='value(state)' 2>/dev/null || true; fi
}
ensure_vm() {
  if [[ $DRY_RUN -eq 1 ]]; then
    if [[ $QUEUED -eq 1 ]]; then show "${QR[@]}" describe "$NAME" "${LOC[@]}" --format='value(state.state)'
    else show "${TPU[@]}" describe "$NAME" "${LOC[@]}" --format='value(state)'; fi
    echo "#   READY/ACTIVE: reuse it; CREATING, PROVISIONING, ...: wait; PREEMPTED, TERMINATED, SUSPENDED, FAILED:"
    echo "#   delete it and create a new one; none: create it:"
    delete_vm; create_vm
    return
  fi
  local state
  while true; do
    state="$(vm_state)"
    case "$state" in
      READY|ACTIVE) echo "# $NAME is $state"; return ;;
      "") create_vm ;;
      CREATING|STARTING|RESTARTING|REPAIRING|ACCEPTED|PROVISIONING|WAITING_FOR_RESOURCES)
        echo "# $NAME is $state; waiting"; sleep 30 ;;
      *) echo "# $NAME is $state: deleting it to create a new one"; delete_vm; create_vm ;;
    esac
  done
}

# -- Every worker's log, live, each line prefixed [worker N] and kept in $LOGS/worker-N.log.
follow_all() {
  local pids=() i status=0
  [[ $DRY_RUN -eq 1 ]] || mkdir -p "$LOGS"
  for ((i = 0; i < WORKERS; i++)); do
    show "${TPU[@]}" ssh "$NAME" "${LOC[@]}" --worker="$i" --command="$FOLLOW"
    echo "#   | tee -a $LOGS/worker-$i.log | sed 's/^/[worker $i] /'"
    [[ $DRY_RUN -eq 1 ]] && continue
    { "${TPU[@]}" ssh "$NAME" "${LOC[@]}" --worker="$i" --command="$FOLLOW" 2>&1 | tee -a "$LOGS/worker-$i.log" \
        | sed -u "s/^/[worker $i] /"; exit "${PIPESTATUS[0]}"; } &
    pids+=($!)
  done
  for ((i = 0; i < ${#pids[@]}; i++)); do
    wait "${pids[i]}" && continue
    local code=$?
    echo "# worker $i: exit $code (log: $LOGS/worker-$i.log)"
    (( code > status )) && status=$code
  done
  return "$status"
}

echo "# TPU $TYPE: $CHIPS chips, $WORKERS worker(s), image $VERSION, zone $ZONE; Python $PYTHON (uv);" \
     "up to $MAX_RESTARTS restart(s)"
[[ -n "$UNTRACKED" ]] && echo "# shipping untracked files too: $UNTRACKED"
TARBALL="${TMPDIR:-/tmp}/transformer_jax_src.$NAME.tar.gz"
echo "+ (cd $REPO && git ls-files -z --cached --others --exclude-standard | tar --null -czf $TARBALL -T -)"
[[ $DRY_RUN -eq 1 ]] || printf '%s\0' "${SHIPPED[@]}" | (cd "$REPO" && tar --null -czf "$TARBALL" -T -)

attempt=0
while true; do
  echo "# attempt $((attempt + 1)) of $((MAX_RESTARTS + 1))"
  ensure_vm
  run "${TPU[@]}" scp "$TARBALL" "$NAME:~/transformer_jax_src.tar.gz" "${LOC[@]}" --worker=all
  on_all "$INSTALL"
  [[ -n "$BUCKET" ]] && on_all "$GCSFUSE"
  on_all "$START"
  code=0
  follow_all || code=$?
  if [[ $DRY_RUN -eq 1 ]]; then
    echo "# the VM preempted, a trainer stopped by a signal (253) or a worker lost (254, 255): back to the top, up to $MAX_RESTARTS more time(s);" \
         "the trainer resumes from its newest checkpoint in $RUNS/$NAME"
  fi
  if (( code == 0 )); then echo "# training finished on all $WORKERS worker(s)"; break; fi
  state="$(vm_state)"
  if [[ "$state" == READY || "$state" == ACTIVE ]] && (( code < 253 )); then
    echo "tpu_vm.sh: training failed (exit $code) on a healthy VM; not restarting. Logs: $LOGS" >&2
    [[ $KEEP -eq 1 ]] || delete_vm
    exit 1
  fi
  if (( attempt >= MAX_RESTARTS )); then
    echo "tpu_vm.sh: $NAME is ${state:-gone} (worker exit $code) and no restarts are left (--max-restarts $MAX_RESTARTS)" >&2
    [[ $KEEP -eq 1 || -z "$state" ]] || delete_vm
    exit 1
  fi
  attempt=$((attempt + 1))
  echo "# $NAME is ${state:-gone} (worker exit $code): restart $attempt of $MAX_RESTARTS, resuming from gs://$BUCKET"
done

if [[ $KEEP -eq 0 ]]; then
  delete_vm
else
  echo "# kept $NAME; delete it with: $(show "${TPU[@]}" delete "$NAME" "${LOC[@]}" --quiet | cut -c3-)"
fi
