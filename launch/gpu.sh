#!/usr/bin/env bash
# Runs jaxcf on GPUs: one host (every local GPU on the data axis), or one process per node (or per
# task) of a multi-node job, joined by jax.distributed through the JAXCF_* variables that
# jaxcf/train/distributed.py reads. `launch/gpu.sh --help` for the options.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/gpu.sh --config=CONFIG --workdir=WORKDIR [options] [-- extra jaxcf.main flags]

One host:    launch/gpu.sh --config=configs/dicap.py:toy --workdir=$HOME/runs/toy
Multi-node, by hand (run on every node, with its own --process-id):
             launch/gpu.sh --coordinator=NODE0:12355 --num-processes=2 --process-id=0 --config=... --workdir=...
SLURM (one task per node, all its GPUs; the values come from SLURM_NTASKS, SLURM_PROCID and the
first host of the step's node list, SLURM_STEP_NODELIST, via `scontrol show hostnames`):
             srun --nodes=2 --ntasks-per-node=1 launch/gpu.sh --config=... --workdir=/shared/run
  With more than one task per node each task gets one GPU (JAXCF_LOCAL_DEVICE_IDS=$SLURM_LOCALID).

Required (flag or environment variable):
  --config=CONFIG              JAXCF_CONFIG               e.g. configs/dicap.py:toy
  --workdir=WORKDIR            JAXCF_WORKDIR              shared by all nodes (NFS, gs://) when multi-node
Multi-node (all three, or none to use SLURM's; none and no SLURM: one host):
  --coordinator=HOST:PORT      JAXCF_COORDINATOR_ADDRESS  address of process 0
  --num-processes=N            JAXCF_NUM_PROCESSES
  --process-id=I               JAXCF_PROCESS_ID           0 .. N-1
Optional:
  --local-device-ids=0,1       JAXCF_LOCAL_DEVICE_IDS     GPUs this process uses (default: all local ones)
  --port=PORT                  JAXCF_COORDINATOR_PORT     coordinator port under SLURM (default 61440 + job id % 4096)
  --python=PYTHON              JAXCF_PYTHON               interpreter (default: python)
  --dry-run                                               print the exports and the command, run nothing
  -h, --help                                              this text
Any other argument (e.g. --config.train.steps=10), and everything after "--", is passed to
jaxcf.main unchanged.
EOF
}

SCRIPT=gpu.sh
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

CONFIG="${JAXCF_CONFIG:-}"
WORKDIR="${JAXCF_WORKDIR:-}"
COORD="${JAXCF_COORDINATOR_ADDRESS:-}"
NUM="${JAXCF_NUM_PROCESSES:-}"
PID="${JAXCF_PROCESS_ID:-}"
DEVICES="${JAXCF_LOCAL_DEVICE_IDS:-}"
PORT="${JAXCF_COORDINATOR_PORT:-}"
PYTHON="${JAXCF_PYTHON:-python}"
DRY_RUN=0
EXTRA=()

value() { [[ -n "${2:-}" && "$2" != --* ]] || die "$1 needs a value"; printf '%s' "$2"; }
set_opt() {
  case "$1" in
    --config) CONFIG="$2" ;; --workdir) WORKDIR="$2" ;; --coordinator|--coordinator-address) COORD="$2" ;;
    --num-processes) NUM="$2" ;; --process-id) PID="$2" ;; --local-device-ids) DEVICES="$2" ;;
    --port) PORT="$2" ;; --python) PYTHON="$2" ;;
  esac
}
OPTS='^--(config|workdir|coordinator|coordinator-address|num-processes|process-id|local-device-ids|port|python)$'
while (( $# )); do
  arg="$1"
  if [[ "$arg" == --*=* && "${arg%%=*}" =~ $OPTS ]]; then
    set_opt "${arg%%=*}" "${arg#*=}"
  elif [[ "$arg" =~ $OPTS ]]; then
    v="$(value "$arg" "${2:-}")"; set_opt "$arg" "$v"; shift
  else
    case "$arg" in
      --dry-run|--dry_run) DRY_RUN=1 ;;
      -h|--help) usage; exit 0 ;;
      --) shift; EXTRA+=("$@"); break ;;
      *) EXTRA+=("$arg") ;;
    esac
  fi
  shift
done

missing=()
[[ -n "$CONFIG" ]] || missing+=("--config (or JAXCF_CONFIG)")
[[ -n "$WORKDIR" ]] || missing+=("--workdir (or JAXCF_WORKDIR)")
if (( ${#missing[@]} )); then
  for m in "${missing[@]}"; do echo "gpu.sh: error: missing $m" >&2; done
  echo "run launch/gpu.sh --help for the usage" >&2
  exit 2
fi

is_uint() { [[ "$1" =~ ^[0-9]{1,9}$ ]]; }

# First host of a SLURM node list such as "gpu[012-015],gpu020".
first_host() {
  if command -v scontrol >/dev/null 2>&1; then
    local hosts
    hosts="$(scontrol show hostnames "$1")" || die "scontrol show hostnames '$1' failed; pass --coordinator=HOST:PORT"
    printf '%s\n' "${hosts%%$'\n'*}"
  elif [[ "$1" != *"["* ]]; then
    printf '%s\n' "${1%%,*}"
  else
    die "cannot expand the SLURM node list '$1' without scontrol; pass --coordinator=HOST:PORT (JAXCF_COORDINATOR_ADDRESS)"
  fi
}

SOURCE="one host"
if [[ -n "$COORD$NUM$PID" ]]; then
  SOURCE="flags"
  [[ -n "$NUM" ]] || die "missing --num-processes (or JAXCF_NUM_PROCESSES) for a multi-node run"
  if ! is_uint "$NUM" || (( 10#$NUM < 1 )); then
    die "--num-processes (JAXCF_NUM_PROCESSES)=$NUM must be an integer >= 1"
  fi
  if (( 10#$NUM > 1 )); then
    [[ -n "$COORD" ]] || die "missing --coordinator=HOST:PORT (or JAXCF_COORDINATOR_ADDRESS) for $NUM processes"
    [[ -n "$PID" ]] || die "missing --process-id (or JAXCF_PROCESS_ID) for $NUM processes"
  fi
elif [[ -n "${SLURM_NTASKS:-}" ]] && is_uint "$SLURM_NTASKS" && (( SLURM_NTASKS > 1 )); then
  SOURCE="SLURM"
  [[ -n "${SLURM_PROCID:-}" && -n "${SLURM_STEP_NODELIST:-}" ]] || \
    die "SLURM_NTASKS=$SLURM_NTASKS but this is not an srun step (SLURM_PROCID / SLURM_STEP_NODELIST unset): start it as 'srun launch/gpu.sh ...', or pass --num-processes=1"
  NUM="$SLURM_NTASKS"
  PID="$SLURM_PROCID"
  NODELIST="$SLURM_STEP_NODELIST"  # the step's nodes (usually the job's): process 0 runs on the first
  if [[ -z "$PORT" ]]; then
    PORT=$(( 61440 + ${SLURM_JOB_ID:-0} % 4096 ))
  fi
  HOST="$(first_host "$NODELIST")"
  [[ -n "$HOST" ]] || die "no host in the SLURM node list '$NODELIST'"
  COORD="$HOST:$PORT"
  nodes="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-$NUM}}"
  if [[ -z "$DEVICES" && -n "${SLURM_LOCALID:-}" ]] && (( NUM > nodes )); then
    DEVICES="$SLURM_LOCALID"  # several tasks per node: one GPU each
  fi
fi
if [[ -n "$PID" ]]; then
  if ! is_uint "$PID" || (( 10#$PID >= 10#${NUM:-1} )); then
    die "--process-id (JAXCF_PROCESS_ID)=$PID must be in 0..$(( ${NUM:-1} - 1 ))"
  fi
fi
if [[ -n "$PORT" ]]; then
  if ! is_uint "$PORT" || (( 10#$PORT < 1 || 10#$PORT > 65535 )); then
    die "--port (JAXCF_COORDINATOR_PORT)=$PORT must be in 1..65535"
  fi
fi

CMD=("$PYTHON" -m jaxcf.main --config="$CONFIG" --workdir="$WORKDIR")
EXPORTS=()
MULTI=0
[[ -n "$NUM" ]] && (( 10#$NUM > 1 )) && MULTI=1
if (( MULTI )); then
  EXPORTS=(JAXCF_COORDINATOR_ADDRESS="$COORD" JAXCF_NUM_PROCESSES="$NUM" JAXCF_PROCESS_ID="$PID")
  [[ -n "$DEVICES" ]] && EXPORTS+=(JAXCF_LOCAL_DEVICE_IDS="$DEVICES")
  CMD+=(--distributed=on)
else
  # one process: whatever JAXCF_* values were inherited must not turn it into a multi-process run
  unset JAXCF_COORDINATOR_ADDRESS JAXCF_NUM_PROCESSES JAXCF_PROCESS_ID JAXCF_LOCAL_DEVICE_IDS
  [[ -n "$DEVICES" ]] && EXPORTS=(CUDA_VISIBLE_DEVICES="$DEVICES")
fi
(( ${#EXTRA[@]} )) && CMD+=("${EXTRA[@]}")

if (( MULTI )); then
  echo "gpu.sh: process $PID of $NUM ($SOURCE), coordinator $COORD" >&2
fi
for e in ${EXPORTS[@]+"${EXPORTS[@]}"}; do
  echo "+ export $(quote "$e")"
  (( DRY_RUN )) || export "${e?}"
done
echo "+ $(quote_all "${CMD[@]}")"
(( DRY_RUN )) && exit 0
command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found: activate the venv or pass --python=PATH (JAXCF_PYTHON)"
exec "${CMD[@]}"
