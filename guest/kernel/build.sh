#!/usr/bin/env bash
# Build the cellvm guest kernel: Debian's linux-source-7.3 + our patch series
# (patches/series) + allnoconfig with config.fragment, as an uncompressed
# vmlinux.
#
# Output: $CELLVM_CACHE/kernel/<key>/vmlinux, where <key> hashes the source
# version, the patches, the config fragment and this script, and the symlink
# $CELLVM_CACHE/kernel/vmlinux -> <key>/vmlinux. A second run with the same
# inputs only refreshes the symlink.
#
# The source .deb comes from the trixie-backports suite through apt with a
# source list of our own under the cache (the machine's apt configuration is
# not touched), pinned to PIN_VERSION with PIN_SHA256. If the mirror has
# dropped that version, the newest 7.3.x is used instead and the series is
# checked to still apply.
#
# Iterating: the patched tree and the object directory live in
# $CELLVM_CACHE/kernel/work and are reused, so a change to one patch only
# rebuilds what it touches.
set -euo pipefail

PIN_VERSION='7.3.4-1~bpo13+1'
PIN_SHA256='703e369ddd4cce971452f5a593ee55df3a5c10c83caf0fa0df039633ed181ee3'
PACKAGE=linux-source-7.3
SUITE=trixie-backports

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${CELLVM_CACHE:-$HOME/.cache/cellvm}/kernel
JOBS=${CELLVM_KERNEL_JOBS:-$(nproc)}
mkdir -p "$CACHE"
t_start=$(date +%s)

say() { echo "kernel: $*" >&2; }
die() { echo "kernel: error: $*" >&2; exit 1; }

# --- 1. the source package -------------------------------------------------

APT_DIR=$CACHE/apt
apt_opts=(
    -o "Dir::Etc::SourceList=$APT_DIR/sources.list"
    -o "Dir::Etc::SourceParts=$APT_DIR/sources.list.d"
    -o "Dir::State::Lists=$APT_DIR/lists"
    -o "Dir::State::Status=/dev/null"
    -o "Dir::Cache=$APT_DIR/cache"
    -o "APT::Sandbox::User=root"
    -o "Debug::NoLocking=1"
)

# The Debian mirror this machine already uses (CELLVM_DEBIAN_MIRROR overrides).
debian_mirror() {
    if [[ -n ${CELLVM_DEBIAN_MIRROR:-} ]]; then echo "$CELLVM_DEBIAN_MIRROR"; return; fi
    local uri
    uri=$( { grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}';
             grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list |
                 sed 's/\[[^]]*\]//' | awk '{print $2}'; } | grep -E '/debian/?$' | head -n1)
    [[ -n $uri ]] || die "no Debian mirror in the apt configuration; set CELLVM_DEBIAN_MIRROR"
    echo "${uri%/}"
}

apt_update() {
    mkdir -p "$APT_DIR/sources.list.d" "$APT_DIR/lists/partial" "$APT_DIR/cache/archives/partial"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $(debian_mirror) $SUITE main" \
        > "$APT_DIR/sources.list"
    apt-get "${apt_opts[@]}" -qq update >&2 || die "apt-get update for $SUITE failed"
}

sha_of() { sha256sum "$1" | cut -d' ' -f1; }

DL=$CACHE/dl
mkdir -p "$DL"
version=$PIN_VERSION
# apt-get download's file name (no epoch in these versions)
deb_path() { echo "$DL/${PACKAGE}_${1}_all.deb"; }
deb=$(deb_path "$version")
if [[ ! -f $deb || $(sha_of "$deb") != "$PIN_SHA256" ]]; then
    apt_update
    # (apt-cache show exits 0 even for a version it does not know)
    if apt-cache "${apt_opts[@]}" show "$PACKAGE=$PIN_VERSION" 2>/dev/null | grep -q '^Version:'; then
        expect_sha=$PIN_SHA256
    else
        version=$(apt-cache "${apt_opts[@]}" madison "$PACKAGE" | awk -F'|' '{gsub(/ /,"",$2); print $2}' |
                  grep -E '^7\.3\.' | sort -V | tail -n1)
        [[ -n $version ]] || die "$SUITE has no $PACKAGE 7.3.x"
        expect_sha=$(apt-cache "${apt_opts[@]}" show "$PACKAGE=$version" | awk '/^SHA256:/{print $2; exit}')
        say "WARNING: pinned $PACKAGE $PIN_VERSION is gone from the mirror; using the newest, $version"
        deb=$(deb_path "$version")
    fi
    if [[ ! -f $deb || $(sha_of "$deb") != "$expect_sha" ]]; then
        (cd "$DL" && apt-get "${apt_opts[@]}" -qq download "$PACKAGE=$version" >&2) ||
            die "downloading $PACKAGE=$version failed"
        [[ -f $deb ]] || die "apt-get download did not produce $deb"
        [[ $(sha_of "$deb") == "$expect_sha" ]] || die "sha256 of $deb does not match the index ($expect_sha)"
    fi
fi
deb_sha=$(sha_of "$deb")
say "source: $PACKAGE $version (sha256 $deb_sha)"

# --- 2. cache key ----------------------------------------------------------

series_files() { grep -v -e '^#' -e '^[[:space:]]*$' "$HERE/patches/series" || true; }
key=$( {
    echo "$version $deb_sha"
    cat "$HERE/patches/series"
    for p in $(series_files); do echo "== $p"; cat "$HERE/patches/$p"; done
    cat "$HERE/config.fragment" "$HERE/build.sh"
} | sha256sum | cut -c1-16)
OUT=$CACHE/$key

publish() {
    ln -sfn "$key/vmlinux" "$CACHE/vmlinux.tmp" && mv -Tf "$CACHE/vmlinux.tmp" "$CACHE/vmlinux"
    say "vmlinux: $OUT/vmlinux"
}
if [[ -f $OUT/vmlinux ]]; then
    say "cached build $key"
    publish
    exit 0
fi

# --- 3. the patched tree (reused between builds) ---------------------------

WORK=$CACHE/work
SRC=$WORK/linux-$version
OBJ=$WORK/build-$version
APPLIED=$SRC/.cellvm-applied      # copy of the series currently applied

unpack() {
    say "unpacking $deb"
    rm -rf "$SRC.tmp" && mkdir -p "$SRC.tmp"
    dpkg-deb --fsys-tarfile "$deb" | tar -xO "./usr/src/$PACKAGE.tar.xz" |
        xz -dc -T0 | tar -x -C "$SRC.tmp" --strip-components=1
    mkdir -p "$SRC.tmp/.cellvm-applied" && : > "$SRC.tmp/.cellvm-applied/series"
    rm -rf "$SRC" && mv "$SRC.tmp" "$SRC"
}

# Take back the previously applied series, newest first. Only the files it
# touches change, so make rebuilds just those.
unapply() {
    local p
    for p in $(grep -v -e '^#' -e '^[[:space:]]*$' "$APPLIED/series" | tac); do
        patch -d "$SRC" -p1 -R -s --batch < "$APPLIED/$p" >&2 || return 1
    done
    rm -f "$APPLIED"/* && : > "$APPLIED/series"
}

apply_series() {
    local p
    for p in $(series_files); do
        patch -d "$SRC" -p1 -s --batch --no-backup-if-mismatch < "$HERE/patches/$p" >&2 ||
            die "patch $p does not apply to $PACKAGE $version"
        cp "$HERE/patches/$p" "$APPLIED/$p"
    done
    cp "$HERE/patches/series" "$APPLIED/series"
}

[[ -d $APPLIED ]] || unpack
if ! cmp -s "$APPLIED/series" "$HERE/patches/series" ||
   ! (cd "$HERE/patches" && for p in $(series_files); do cmp -s "$p" "$APPLIED/$p" || exit 1; done); then
    unapply || { say "the old series does not come off cleanly; unpacking afresh"; unpack; }
    apply_series
    say "applied $(series_files | wc -l) patches"
fi

# --- 4. configure ----------------------------------------------------------

mkdir -p "$OBJ"
make -C "$SRC" O="$OBJ" -s KCONFIG_ALLCONFIG="$HERE/config.fragment" allnoconfig >&2

# Options whose loss would break the guest silently: dependency resolution
# in allnoconfig drops a requested option without a word.
must_have=(
    SMP X86_64 PARAVIRT KVM_GUEST PVH X86_X2APIC SERIAL_8250_CONSOLE
    BLK_DEV_INITRD RD_GZIP DEVTMPFS VIRTIO_MMIO VIRTIO_MMIO_CMDLINE_DEVICES
    VIRTIO_BLK VIRTIO_CONSOLE HW_RANDOM_VIRTIO VIRTIO_NET VIRTIO_VSOCKETS
    UNIX INET EXT4_FS OVERLAY_FS EROFS_FS TMPFS UNIX98_PTYS FUTEX EPOLL
    EVENTFD TIMERFD SIGNALFD CGROUPS MEMCG SECCOMP SECCOMP_FILTER
    PARAVIRT_CLOCK MITIGATION_PAGE_TABLE_ISOLATION PVM_GUEST SLUB_TINY PROC_FS SYSFS
)
must_not=(MODULES RANDOMIZE_BASE ACPI)
for o in "${must_have[@]}"; do
    grep -q "^CONFIG_$o=y" "$OBJ/.config" || die "CONFIG_$o did not survive allnoconfig"
done
for o in "${must_not[@]}"; do
    grep -q "^CONFIG_$o=y" "$OBJ/.config" && die "CONFIG_$o must be off"
done

# --- 5. build --------------------------------------------------------------

say "building vmlinux with -j$JOBS in $OBJ"
t_build=$(date +%s)
make -C "$SRC" O="$OBJ" -j"$JOBS" -s vmlinux >&2 || die "kernel build failed"
say "build took $(( $(date +%s) - t_build )) s"

mkdir -p "$OUT.tmp"
cp "$OBJ/vmlinux" "$OBJ/.config" "$OBJ/System.map" "$OUT.tmp/"
echo "$PACKAGE $version" > "$OUT.tmp/source-version"
rm -rf "$OUT" && mv "$OUT.tmp" "$OUT"
publish
say "done in $(( $(date +%s) - t_start )) s"
