# Helpers shared by launch/tpu_vm.sh and launch/gpu.sh (sourced; SCRIPT names the caller in errors).

die() { echo "${SCRIPT}: error: $*" >&2; exit 2; }

# Shell-quotes one word only where needed, so dry-run lines can be pasted back into a shell.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then printf '%s' "$1"; else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
quote_all() { local out=() a; for a in "$@"; do out+=("$(quote "$a")"); done; printf '%s' "${out[*]}"; }
