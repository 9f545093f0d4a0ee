#!/usr/bin/env bash
# Installs what cellvm needs on a Debian 12 machine and builds everything,
# caching outputs under $CELLVM_CACHE so a second run is fast.
#   1. Debian packages: the union of scripts/apt/*.txt (apt-get only if some are missing)
#   2. scripts/stages/NN-*.sh in order, each timed
set -euo pipefail
export REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export CELLVM_CACHE="${CELLVM_CACHE:-$HOME/.cache/cellvm}"
export VENV="$REPO/.venv"
export PY="$VENV/bin/python"
mkdir -p "$CELLVM_CACHE"

now() { date +%s.%N; }
report() { printf 'stage %-18s %6.1f s\n' "$1" "$(echo "$(now) - $2" | bc)"; }
command -v bc >/dev/null || { apt-get update -q && apt-get install -y -q bc; }

started=$(now)
mapfile -t wanted < <(cat "$REPO"/scripts/apt/*.txt | sed 's/#.*//' | tr -s ' \t' '\n' | grep -v '^$' | sort -u)
missing=()
for pkg in "${wanted[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
report apt "$started"

for stage in "$REPO"/scripts/stages/[0-9][0-9]-*.sh; do
  [ -x "$stage" ] || continue
  name="$(basename "$stage" .sh)"
  started=$(now)
  "$stage"
  report "$name" "$started"
done
