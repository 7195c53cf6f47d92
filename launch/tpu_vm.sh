#!/usr/bin/env bash
# Runs jaxcf on a Cloud TPU VM (one host or a pod slice): create the VM if missing, copy the code
# to every worker, set up a venv once, then run `python -m jaxcf.main` on all workers together.
# `launch/tpu_vm.sh --help` for the options; `--dry-run` prints the commands without running them.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_vm.sh --name=NAME --zone=ZONE --accelerator-type=TYPE --version=RUNTIME \
         --config=CONFIG --workdir=WORKDIR [options] [-- extra jaxcf.main flags]

Creates the TPU VM NAME if it does not exist, copies this checkout (or clones --repo) to
~/jaxcf on every worker, installs it once into ~/jaxcf-venv (pip install -e '.[tpu]'), and runs
  python -m jaxcf.main --config=CONFIG --workdir=WORKDIR --distributed=on [extra flags]
on all workers at once (gcloud compute tpus tpu-vm ssh --worker=all).

Required (flag or environment variable):
  --name=NAME               JAXCF_TPU_NAME      TPU VM name
  --zone=ZONE               JAXCF_TPU_ZONE      e.g. us-central2-b
  --accelerator-type=TYPE   JAXCF_TPU_TYPE      e.g. v4-8 (one host), v4-32, v5litepod-16 (pod slices)
  --version=RUNTIME         JAXCF_TPU_VERSION   TPU runtime, e.g. tpu-ubuntu2204-base, v2-alpha-tpuv5-lite
  --config=CONFIG           JAXCF_CONFIG        e.g. configs/dicap.py:toy (a path in the repo)
  --workdir=WORKDIR         JAXCF_WORKDIR       gs://BUCKET/run (needed on multi-host slices: all
                                                workers write the same checkpoints) or a local path
Optional:
  --project=PROJECT         JAXCF_GCP_PROJECT   GCP project (default: gcloud's configured one)
  --repo=URL                JAXCF_REPO          git clone URL on the workers instead of copying this checkout
  --ref=REF                 JAXCF_REPO_REF      branch or tag to clone with --repo
  --spot                                        create a Spot TPU VM
  --reinstall                                   redo the venv setup even if it was done before
  --dry-run                                     print every command (prefixed "+ "), run nothing
  -h, --help                                    this text
Any other argument (e.g. --config.train.steps=10), and everything after "--", is passed to
jaxcf.main unchanged.
EOF
}

SCRIPT=tpu_vm.sh
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

DRY_RUN=0
# Runs a command, or prints it in --dry-run mode.
run() {
  if (( DRY_RUN )); then echo "+ $(quote_all "$@")"; else echo "+ $(quote_all "$@")" >&2; "$@"; fi
}

NAME="${JAXCF_TPU_NAME:-}"
ZONE="${JAXCF_TPU_ZONE:-}"
TYPE="${JAXCF_TPU_TYPE:-}"
VERSION="${JAXCF_TPU_VERSION:-}"
CONFIG="${JAXCF_CONFIG:-}"
WORKDIR="${JAXCF_WORKDIR:-}"
PROJECT="${JAXCF_GCP_PROJECT:-}"
REPO="${JAXCF_REPO:-}"
REF="${JAXCF_REPO_REF:-}"
SPOT=0
REINSTALL=0
EXTRA=()

# Accepts --opt=value and --opt value.
value() { [[ -n "${2:-}" && "$2" != --* ]] || die "$1 needs a value"; printf '%s' "$2"; }
while (( $# )); do
  arg="$1"
  case "$arg" in
    --name=*) NAME="${arg#*=}" ;;
    --zone=*) ZONE="${arg#*=}" ;;
    --accelerator-type=*|--accelerator_type=*) TYPE="${arg#*=}" ;;
    --version=*|--runtime-version=*) VERSION="${arg#*=}" ;;
    --config=*) CONFIG="${arg#*=}" ;;
    --workdir=*) WORKDIR="${arg#*=}" ;;
    --project=*) PROJECT="${arg#*=}" ;;
    --repo=*) REPO="${arg#*=}" ;;
    --ref=*) REF="${arg#*=}" ;;
    --name|--zone|--accelerator-type|--accelerator_type|--version|--runtime-version|--config|--workdir|--project|--repo|--ref)
      v="$(value "$arg" "${2:-}")"; shift
      case "$arg" in
        --name) NAME="$v" ;; --zone) ZONE="$v" ;; --accelerator-type|--accelerator_type) TYPE="$v" ;;
        --version|--runtime-version) VERSION="$v" ;; --config) CONFIG="$v" ;; --workdir) WORKDIR="$v" ;;
        --project) PROJECT="$v" ;; --repo) REPO="$v" ;; --ref) REF="$v" ;;
      esac ;;
    --spot) SPOT=1 ;;
    --reinstall) REINSTALL=1 ;;
    --dry-run|--dry_run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA+=("$@"); break ;;
    *) EXTRA+=("$arg") ;;
  esac
  shift
done

missing=()
[[ -n "$NAME" ]] || missing+=("--name (or JAXCF_TPU_NAME)")
[[ -n "$ZONE" ]] || missing+=("--zone (or JAXCF_TPU_ZONE)")
[[ -n "$TYPE" ]] || missing+=("--accelerator-type (or JAXCF_TPU_TYPE)")
[[ -n "$VERSION" ]] || missing+=("--version (or JAXCF_TPU_VERSION)")
[[ -n "$CONFIG" ]] || missing+=("--config (or JAXCF_CONFIG)")
[[ -n "$WORKDIR" ]] || missing+=("--workdir (or JAXCF_WORKDIR)")
if (( ${#missing[@]} )); then
  for m in "${missing[@]}"; do echo "tpu_vm.sh: error: missing $m" >&2; done
  echo "run launch/tpu_vm.sh --help for the usage" >&2
  exit 2
fi
[[ -n "$REF" && -z "$REPO" ]] && die "--ref (JAXCF_REPO_REF) needs --repo (JAXCF_REPO)"
if [[ "$WORKDIR" != gs://* ]]; then
  echo "tpu_vm.sh: warning: --workdir=$WORKDIR is not gs://; on a multi-host slice every worker needs the" \
       "same checkpoint folder (a bucket)" >&2
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
GCLOUD_COMMON=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && GCLOUD_COMMON+=(--project="$PROJECT")
TPU=(gcloud compute tpus tpu-vm)

# Runs a shell command on every worker of the slice at once.
on_all_workers() { run "${TPU[@]}" ssh "$NAME" "${GCLOUD_COMMON[@]}" --worker=all --command "$1"; }

# 1. The TPU VM: create it unless it exists.
CREATE=("${TPU[@]}" create "$NAME" "${GCLOUD_COMMON[@]}" --accelerator-type="$TYPE" --version="$VERSION")
(( SPOT )) && CREATE+=(--spot)
if (( DRY_RUN )); then
  run "${TPU[@]}" describe "$NAME" "${GCLOUD_COMMON[@]}" --format='value(state)'
  echo "# (the next command runs only when describe finds no TPU VM named $NAME; a STOPPED one is started)"
  run "${CREATE[@]}"
else
  state="$("${TPU[@]}" describe "$NAME" "${GCLOUD_COMMON[@]}" --format='value(state)' 2>/dev/null)" || state=""
  case "$state" in
    "") run "${CREATE[@]}" ;;
    STOPPED) run "${TPU[@]}" start "$NAME" "${GCLOUD_COMMON[@]}" ;;
    PREEMPTED|TERMINATED)
      die "TPU VM $NAME is $state; delete it (gcloud compute tpus tpu-vm delete $NAME --zone=$ZONE) and rerun" ;;
    *) echo "tpu_vm.sh: TPU VM $NAME in $ZONE is $state" >&2 ;;
  esac
fi

# 2. The code, in ~/jaxcf on every worker.
if [[ -n "$REPO" ]]; then
  branch=""
  [[ -n "$REF" ]] && branch="--branch $(quote "$REF") "
  on_all_workers "if [ -d ~/jaxcf/.git ]; then git -C ~/jaxcf pull --ff-only; else git clone --depth=1 ${branch}$(quote "$REPO") ~/jaxcf; fi"
else
  TARBALL="${TMPDIR:-/tmp}/jaxcf-$NAME.tar.gz"
  run tar -czf "$TARBALL" -C "$ROOT" --exclude=.git --exclude=.venv --exclude=workdirs --exclude=__pycache__ \
    --exclude=.pytest_cache --exclude='*.egg-info' .
  run "${TPU[@]}" scp "$TARBALL" "$NAME:~/jaxcf.tar.gz" "${GCLOUD_COMMON[@]}" --worker=all
  on_all_workers "mkdir -p ~/jaxcf && tar -xzf ~/jaxcf.tar.gz -C ~/jaxcf"
fi

# 3. The environment, once per worker (a marker file records that it is done).
# shellcheck disable=SC2088  # the ~ is expanded by the worker's shell
MARKER='~/jaxcf-venv/.jaxcf-installed'
SETUP="python3 -m venv ~/jaxcf-venv && ~/jaxcf-venv/bin/pip install -q -U pip && cd ~/jaxcf && ~/jaxcf-venv/bin/pip install -q -e \".[tpu]\" && touch $MARKER"
if (( REINSTALL )); then on_all_workers "$SETUP"; else on_all_workers "test -f $MARKER || ($SETUP)"; fi

# 4. The run, on all workers together (jax.distributed finds the slice's hosts itself).
MAIN="python -m jaxcf.main --config=$(quote "$CONFIG") --workdir=$(quote "$WORKDIR") --distributed=on"
(( ${#EXTRA[@]} )) && MAIN+=" $(quote_all "${EXTRA[@]}")"
on_all_workers "cd ~/jaxcf && . ~/jaxcf-venv/bin/activate && $MAIN"
