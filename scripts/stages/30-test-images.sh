#!/usr/bin/env bash
# OCI layouts of the test images (busybox, python:3.11, node:24 and small synthetic ones)
# under $CELLVM_CACHE/test-images/<hash of the builder>, plus a "current" symlink to it.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"   # debootstrap and chroot live there
builder="$REPO/tests/images/testimages.py"
hash=$(cat "$builder" | sha256sum | cut -c1-16)
root="$CELLVM_CACHE/test-images"
target="$root/$hash"
if [ -f "$target/images.json" ]; then
  echo "test-images: up to date ($target)"
else
  mkdir -p "$root"
  for tool in debootstrap npm busybox; do
    command -v "$tool" >/dev/null || { echo "test-images: $tool is missing (see scripts/apt/images.txt; npm comes with nodejs here)" >&2; exit 1; }
  done
  [ "$(id -u)" = 0 ] || { echo "test-images: debootstrap and chroot need root" >&2; exit 1; }
  PYTHONPATH="$REPO/sdk" "$PY" "$builder" "$target"
  # older builds are dead weight once a new one exists
  find "$root" -mindepth 1 -maxdepth 1 -type d ! -name "$hash" -exec rm -rf {} +
fi
ln -sfn "$hash" "$root/current"
echo "test-images: $(du -sh "$target" | cut -f1) in $target"
