#!/usr/bin/env bash
# Build the cellvm guest agent: a static binary (glibc's libc.a, libc6-dev),
# -Wall -Wextra -Werror clean.
#
# Output: $CELLVM_CACHE/agent/<key>/cellvm-agent, where <key> hashes the
# sources, this script and the compiler version, and the symlink
# $CELLVM_CACHE/agent/cellvm-agent -> <key>/cellvm-agent. A second run with
# the same inputs only refreshes the symlink.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${CELLVM_CACHE:-$HOME/.cache/cellvm}/agent
CC=${CC:-gcc}
mkdir -p "$CACHE"

key=$( { cat "$HERE"/*.c "$HERE"/*.h "$HERE"/build.sh; "$CC" --version; } | sha256sum | cut -c1-16)
OUT=$CACHE/$key
if [[ ! -x $OUT/cellvm-agent ]]; then
    rm -rf "$OUT.tmp.$$" && mkdir -p "$OUT.tmp.$$"
    "$CC" -static -O2 -g0 -std=gnu11 -Wall -Wextra -Werror -o "$OUT.tmp.$$/cellvm-agent" "$HERE"/*.c
    rm -rf "$OUT" && mv "$OUT.tmp.$$" "$OUT"
fi
ln -sfn "$key/cellvm-agent" "$CACHE/cellvm-agent.tmp.$$"
mv -Tf "$CACHE/cellvm-agent.tmp.$$" "$CACHE/cellvm-agent"
echo "agent: $OUT/cellvm-agent" >&2
