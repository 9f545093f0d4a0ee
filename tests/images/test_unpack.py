"""Layer application: entries that would escape the root are rejected without
touching anything outside it; non-root unpacking degrades as documented."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from testimages import Entry, tar_entries

from cellvm.errors import UnsafeLayer
from cellvm.images.unpack import LayerApplier


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory next to the root that no layer may touch."""
    directory = tmp_path / "outside"
    directory.mkdir()
    (directory / "secret").write_text("untouched")
    return directory


@pytest.fixture
def root(tmp_path: Path) -> Path:
    directory = tmp_path / "a" / "root"
    directory.mkdir(parents=True)
    return directory


def snapshot(directory: Path) -> dict[str, tuple[int, int, bytes | str]]:
    state = {}
    for path in sorted(directory.rglob("*")):
        st = path.lstat()
        content = os.readlink(path) if path.is_symlink() else path.read_bytes() if path.is_file() else b""
        state[str(path.relative_to(directory))] = (st.st_mode, st.st_nlink, content)
    return state


def apply(root: Path, *layers: list[Entry], keep_ownership: bool | None = None) -> LayerApplier:
    applier = LayerApplier(root, keep_ownership=keep_ownership)
    for layer in layers:
        applier.apply_stream(io.BytesIO(tar_entries(layer)))
    return applier


@pytest.mark.parametrize(
    "layers",
    [
        pytest.param([[Entry("/abs-file", data=b"x")]], id="absolute-path"),
        pytest.param([[Entry("../outside/new", data=b"x")]], id="dotdot"),
        pytest.param([[Entry("dir/../../outside/new", data=b"x")]], id="dotdot-inside"),
        pytest.param([[Entry("evil", "symlink", target="../../outside")], [Entry("evil/new", data=b"x")]], id="through-symlink"),
        pytest.param([[Entry("evil", "symlink", target="../../outside"), Entry("evil/secret", data=b"x")]], id="through-symlink-same-layer"),
        pytest.param(
            [[Entry("d", "dir"), Entry("d/up", "symlink", target="../.."), Entry("d/up/outside/secret", data=b"x")]],
            id="through-relative-symlink-chain",
        ),
        pytest.param(
            [[Entry("x", "dir"), Entry("x/a", data=b"a"), Entry("x", "symlink", target="../../outside"), Entry("x/secret", data=b"x")]],
            id="directory-replaced-by-symlink-mid-layer",
        ),
        pytest.param([[Entry("link", "hardlink", target="../outside/secret")]], id="hardlink-dotdot"),
        pytest.param([[Entry("link", "hardlink", target="/etc/passwd")]], id="hardlink-absolute"),
        pytest.param(
            [[Entry("esc", "symlink", target="../../outside")], [Entry("link", "hardlink", target="esc/secret")]],
            id="hardlink-through-symlink",
        ),
        pytest.param([[Entry("evil", "symlink", target="../../outside")], [Entry("evil/.wh.secret")]], id="whiteout-through-symlink"),
        pytest.param([[Entry(".wh..")]], id="whiteout-of-dotdot"),
        pytest.param([[Entry("evil", "symlink", target="../../outside")], [Entry("evil/.wh..wh..opq")]], id="opaque-through-symlink"),
    ],
)
def test_escaping_entries_are_rejected(root: Path, outside: Path, layers: list[list[Entry]]) -> None:
    before = snapshot(outside.parent)
    with pytest.raises(UnsafeLayer):
        apply(root, *layers)
    after = snapshot(outside.parent)
    # Only paths inside the root may have changed.
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert all(k.startswith("a/root") or k == "a" for k in changed), changed
    assert (outside / "secret").read_text() == "untouched"


def test_absolute_symlinks_resolve_inside_the_root(root: Path, outside: Path) -> None:
    # An absolute symlink means the image's own path, as in a chroot: writing through it stays inside.
    apply(root, [Entry("abs", "symlink", target=str(outside))], [Entry("abs/secret", data=b"inside")])
    assert (outside / "secret").read_text() == "untouched"
    assert (root / str(outside).lstrip("/") / "secret").read_bytes() == b"inside"


def test_a_file_replaces_a_symlink_instead_of_writing_through_it(root: Path, outside: Path) -> None:
    apply(root, [Entry("f", "symlink", target=str(outside / "secret"))], [Entry("f", data=b"mine")])
    assert not (root / "f").is_symlink()
    assert (root / "f").read_bytes() == b"mine"
    assert (outside / "secret").read_text() == "untouched"


def test_whiteouts_and_opaque_directories(root: Path) -> None:
    apply(
        root,
        [
            Entry("d", "dir"), Entry("d/a", data=b"a"), Entry("d/b", data=b"b"),
            Entry("o", "dir"), Entry("o/lower", data=b"l"), Entry("o/sub", "dir"), Entry("o/sub/deep", data=b"d"),
        ],
        [
            Entry("d/.wh.a"),
            Entry("o/sub", "dir"), Entry("o/sub/new", data=b"n"),  # listed before the marker: kept
            Entry("o/.wh..wh..opq"),
            Entry("o/after", data=b"after"),  # listed after the marker: kept
        ],
    )  # fmt: skip
    assert sorted(p.name for p in (root / "d").iterdir()) == ["b"]
    assert sorted(str(p.relative_to(root)) for p in (root / "o").rglob("*")) == ["o/after", "o/sub", "o/sub/new"]


def test_without_root_devices_are_skipped_and_directories_stay_writable(root: Path) -> None:
    applier = apply(
        root,
        [Entry("dev", "dir"), Entry("dev/null", "chardev", mode=0o666, device=(1, 3)), Entry("ro", "dir", mode=0o555)],
        [Entry("ro/later", data=b"written into a read-only directory of a lower layer")],
        keep_ownership=False,
    )
    assert applier.stats.skipped_devices == ["dev/null"]
    assert not (root / "dev" / "null").exists()
    assert (root / "ro" / "later").exists()


def test_a_hardlink_to_a_lower_layer_file(root: Path) -> None:
    apply(root, [Entry("f", data=b"shared")], [Entry("g", "hardlink", target="f")])
    assert (root / "f").stat().st_ino == (root / "g").stat().st_ino
