#!/usr/bin/env bash
# Stage 20: the PVM guest kernel (vmlinux) and the test initramfs, both cached
# under $CELLVM_CACHE/kernel (see guest/kernel/build.sh, guest/init/build.sh).
set -euo pipefail
REPO=${REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
"$REPO/guest/kernel/build.sh"
"$REPO/guest/init/build.sh"
