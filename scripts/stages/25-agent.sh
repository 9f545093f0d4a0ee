#!/usr/bin/env bash
# Stage 25: the guest agent (static C, PID 1 of a cellvm VM), cached under
# $CELLVM_CACHE/agent/<key>/cellvm-agent with the symlink
# $CELLVM_CACHE/agent/cellvm-agent (see guest/agent/build.sh).
set -euo pipefail
REPO=${REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
"$REPO/guest/agent/build.sh"
