"""The `cellvm` command line.

Each subcommand is one `add_*` function that registers its arguments and
its handler; a new subcommand (run, kernel install) is one more such
function listed in COMMANDS.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import anyio
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TaskID, TextColumn, TransferSpeedColumn
from rich.table import Table

from cellvm.errors import CellvmError
from cellvm.images import Image, ImageStore, PullReporter, pull
from cellvm.images.reference import parse_reference
from cellvm.images.rootfs import FORMATS
from cellvm.images.sources import local_source
from cellvm.run import add_run
from cellvm.sandbox import prune_templates

Handler = Callable[[argparse.Namespace], int]


# -- pull ------------------------------------------------------------------------------------


class RichPullReporter(PullReporter):
    """One progress bar per layer, on stderr; used only when stderr is a terminal."""

    def __init__(self, console: Console) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TextColumn("{task.fields[state]}"),
            console=console,
            transient=False,
        )
        self.tasks: dict[str, TaskID] = {}
        self.build_task: TaskID | None = None
        self.build_started = 0.0

    def __enter__(self) -> RichPullReporter:
        self.progress.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.progress.stop()

    def _task(self, digest: str, size: int) -> TaskID:
        if digest not in self.tasks:
            self.tasks[digest] = self.progress.add_task(digest.split(":")[1][:12], total=size, state="")
        return self.tasks[digest]

    def resolved(self, name: str, digest: str) -> None:
        self.progress.console.print(f"{name}: {digest}")

    def layer_started(self, digest: str, size: int) -> None:
        self.progress.update(self._task(digest, size), state="downloading")

    def layer_advanced(self, digest: str, nbytes: int) -> None:
        self.progress.advance(self.tasks[digest], nbytes)

    def layer_finished(self, digest: str) -> None:
        task = self.tasks[digest]
        self.progress.update(task, completed=self.progress.tasks[task].total, state="verified")

    def layer_cached(self, digest: str, size: int) -> None:
        self.progress.update(self._task(digest, size), completed=size, state="cached")

    def building(self, fmt: str) -> None:
        self.build_started = time.monotonic()
        self.build_task = self.progress.add_task(f"rootfs.{fmt}", total=None, state="unpacking, building")

    def done(self, image: Image) -> None:
        if self.build_task is not None:
            self.progress.remove_task(self.build_task)
            seconds = time.monotonic() - self.build_started
            self.progress.console.print(f"rootfs.{image.rootfs_format}: {human_size(image.size)}, built in {seconds:.1f} s")


def add_pull(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("pull", help="pull an image and build its root filesystem")
    parser.add_argument("image", help="node:24, registry:port/repo:tag, repo@sha256:..., oci:DIR[:TAG], docker-archive:FILE")
    parser.add_argument("--platform", help="os/arch[/variant] to pick from a multi-platform image (default: this host)")
    parser.add_argument("--format", choices=FORMATS, default="erofs", help="root filesystem format (default: erofs)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars (the default when not a terminal)")
    parser.set_defaults(handler=run_pull)


def run_pull(args: argparse.Namespace) -> int:
    stderr = Console(stderr=True)
    show_progress = stderr.is_terminal and not args.quiet

    async def go() -> Image:
        if not show_progress:
            return await pull(args.image, platform=args.platform, rootfs_format=args.format)
        with RichPullReporter(stderr) as reporter:
            return await pull(args.image, platform=args.platform, rootfs_format=args.format, reporter=reporter)

    image = anyio.run(go)
    print(f"{image.name} {image.digest} {image.rootfs}")
    return 0


# -- images, rm, prune -------------------------------------------------------------------------


def human_size(size: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def human_age(seconds: float) -> str:
    for unit, length in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= length:
            count = int(seconds // length)
            return f"{count} {unit}{'s' if count != 1 else ''} ago"
    return "just now"


def add_images(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("images", help="list pulled images")
    parser.set_defaults(handler=run_images)


def run_images(args: argparse.Namespace) -> int:
    table = Table(box=None, pad_edge=False)
    for column in ("NAME", "DIGEST", "SIZE", "AGE"):
        table.add_column(column, no_wrap=True)
    now = time.time()
    for record in sorted(ImageStore().list(), key=lambda r: r.name):
        table.add_row(record.name, record.digest[:19], human_size(record.size), human_age(now - record.pulled_at))
    Console(width=200 if not sys.stdout.isatty() else None).print(table)
    return 0


def canonical_name(text: str) -> str:
    """The name pull recorded: node:24 and docker.io/library/node:24 are one image."""
    local = local_source(text)
    return local.name if local is not None else parse_reference(text).familiar


def add_rm(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("rm", help="forget images (their data goes at the next prune)")
    parser.add_argument("images", nargs="+")
    parser.set_defaults(handler=run_rm)


def run_rm(args: argparse.Namespace) -> int:
    store = ImageStore()
    for name in args.images:
        store.remove(canonical_name(name))
        print(f"removed {name}")
    return 0


def add_prune(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "prune",
        help="delete cached blobs and root filesystems no image name uses, and sandbox templates "
        "the installed kernel and agent cannot use",
    )
    parser.set_defaults(handler=run_prune)


def run_prune(args: argparse.Namespace) -> int:
    removed, freed = anyio.run(ImageStore().prune)
    print(f"removed {removed} files, freed {human_size(freed)}")
    templates, template_bytes = anyio.run(prune_templates)  # after the images: a template of a deleted rootfs goes too
    print(f"removed {templates} sandbox templates, freed {human_size(template_bytes)}")
    return 0


# -- entry point ---------------------------------------------------------------------------------

COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_run, add_pull, add_images, add_rm, add_prune]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cellvm", description="Run code in microVMs restored from snapshots.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except CellvmError as exc:
        print(f"cellvm {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
