#!/usr/bin/env bash
# Developer helper: turn the commits of a git-managed kernel work tree into
# patches/ and patches/series, and mark them as applied in that tree so
# build.sh rebuilds only what changed.
#
# Workflow: after build.sh has unpacked $CELLVM_CACHE/kernel/work/linux-<ver>,
#   cd $CELLVM_CACHE/kernel/work/linux-<ver>
#   git init -q && echo .cellvm-applied/ >> .git/info/exclude
#   git add -f $(ls -A | grep -vx -e .git -e .cellvm-applied) && git commit -qm base
#   (then "git am" the series, or keep working: one commit per patch, the
#   commit message is the patch header: what it does and why)
#   guest/kernel/export-series.sh     # then build.sh, tests, commit patches/
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${CELLVM_CACHE:-$HOME/.cache/cellvm}/kernel
TREE=${1:-$(ls -d "$CACHE"/work/linux-* | head -n1)}
P=$HERE/patches

cd "$TREE"
base=$(git rev-list --max-parents=0 HEAD)
[[ -z $(git status --porcelain --untracked-files=no -- . ':!.cellvm-applied') ]] ||
    { echo "export-series: $TREE has uncommitted changes" >&2; exit 1; }
rm -f "$P"/*.patch
git format-patch -q --no-signature --zero-commit -o "$P" "$base"..HEAD
{ echo "# cellvm guest layer for kvm-pvm, applied in order with \`patch -p1\`."
  (cd "$P" && ls ./*.patch | sed 's|^\./||'); } > "$P/series"
rm -rf .cellvm-applied && mkdir .cellvm-applied
cp "$P"/series "$P"/*.patch .cellvm-applied/
echo "export-series: $(grep -vc '^#' "$P/series") patches from $TREE" >&2
