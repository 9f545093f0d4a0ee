#!/usr/bin/env python3
"""Write a gzip'd newc cpio archive (an initramfs) from a spec, without root.

Spec lines (one entry each, parents before children):
    dir  <path> <mode>
    file <path> <mode> <host file>
    link <path> <target>
    nod  <path> <mode> c|b <major> <minor>
"""
import gzip
import stat
import sys


def entry(out, ino, name, mode, data=b"", rdev=(0, 0)):
    name_b = name.encode() + b"\0"
    fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name_b), 0]
    out.write(b"070701" + b"".join(b"%08X" % f for f in fields))
    out.write(name_b + b"\0" * (-(110 + len(name_b)) % 4))
    out.write(data + b"\0" * (-len(data) % 4))


def main(spec_path, out_path):
    with open(out_path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as out:
        ino = 1
        for line in open(spec_path):
            f = line.split()
            if not f or f[0].startswith("#"):
                continue
            kind, path = f[0], f[1].lstrip("/")
            if kind == "dir":
                entry(out, ino, path, stat.S_IFDIR | int(f[2], 8))
            elif kind == "file":
                with open(f[3], "rb") as src:
                    entry(out, ino, path, stat.S_IFREG | int(f[2], 8), src.read())
            elif kind == "link":
                entry(out, ino, path, stat.S_IFLNK | 0o777, f[2].encode())
            elif kind == "nod":
                kind_bits = stat.S_IFCHR if f[3] == "c" else stat.S_IFBLK
                entry(out, ino, path, kind_bits | int(f[2], 8), rdev=(int(f[4]), int(f[5])))
            else:
                sys.exit(f"mkcpio: unknown entry kind {kind!r}")
            ino += 1
        entry(out, 0, "TRAILER!!!", 0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
