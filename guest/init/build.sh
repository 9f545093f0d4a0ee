#!/usr/bin/env bash
# Build the cellvm test init (static C, PID 1 of the guest-kernel boot
# tests) and pack it with busybox (static, from busybox-static) into an
# initramfs: $CELLVM_CACHE/kernel/testinit-<key>/testinit.cpio.gz, with the
# symlink $CELLVM_CACHE/kernel/testinit.cpio.gz. <key> hashes the sources,
# this script and the busybox binary, so a second run only checks the hash.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${CELLVM_CACHE:-$HOME/.cache/cellvm}/kernel
BUSYBOX=${CELLVM_BUSYBOX:-/bin/busybox}
mkdir -p "$CACHE"

[[ -x $BUSYBOX ]] && file -L "$BUSYBOX" 2>/dev/null | grep -q 'statically linked' ||
    { echo "testinit: error: $BUSYBOX is not a static busybox (apt-get install busybox-static)" >&2; exit 1; }

key=$(cat "$HERE"/*.c "$HERE"/*.h "$HERE"/build.sh "$HERE"/mkcpio.py "$BUSYBOX" | sha256sum | cut -c1-16)
OUT=$CACHE/testinit-$key
if [[ ! -f $OUT/testinit.cpio.gz ]]; then
    rm -rf "$OUT.tmp" && mkdir -p "$OUT.tmp"
    gcc -static -O2 -Wall -Wextra -Werror -o "$OUT.tmp/init" \
        "$HERE"/testinit.c "$HERE"/isolation.c "$HERE"/vector.c -lpthread
    {
        echo "dir /dev 0755"
        echo "nod /dev/console 0600 c 5 1"
        echo "nod /dev/null 0666 c 1 3"
        for d in proc sys tmp bin; do echo "dir /$d 0755"; done
        echo "file /init 0755 $OUT.tmp/init"
        echo "file /bin/busybox 0755 $BUSYBOX"
        for applet in $("$BUSYBOX" --list); do
            [[ $applet == busybox ]] || echo "link /bin/$applet busybox"
        done
    } > "$OUT.tmp/spec"
    python3 "$HERE/mkcpio.py" "$OUT.tmp/spec" "$OUT.tmp/testinit.cpio.gz"
    rm -rf "$OUT" && mv "$OUT.tmp" "$OUT"
fi
ln -sfn "testinit-$key/testinit.cpio.gz" "$CACHE/testinit.cpio.gz.tmp"
mv -Tf "$CACHE/testinit.cpio.gz.tmp" "$CACHE/testinit.cpio.gz"
echo "testinit: $OUT/testinit.cpio.gz" >&2
