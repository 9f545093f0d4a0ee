"""`cellvm run IMAGE [-- CMD...]`: docker-run for microVMs.

Zero flags for the common case: the image's ENTRYPOINT/CMD (or CMD given
after `--`) runs in a sandbox restored from the image's template; stdin,
stdout, stderr and the exit code pass through. `-it` gives a terminal.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import termios
import tty
from contextlib import contextmanager
from collections.abc import Iterator

import anyio

from cellvm.errors import CellvmError
from cellvm.images import pull
from cellvm.sandbox import Sandbox


def parse_memory(text: str) -> int:
    """MiB from docker-style sizes: 512, 512m, 1g, 1.5G."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgKMG]?)[bB]?", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"not a memory size: {text!r} (try 512m or 2g)")
    value, unit = float(match[1]), match[2].lower()
    mib = value / 1024 if unit == "k" else value * 1024 if unit == "g" else value
    return int(mib)


def parse_env(items: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        # `-e NAME` alone takes the value from this environment, as docker does.
        env[name] = value if sep else os.environ.get(name, "")
    return env


def add_run(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("run", help="run a command in a new microVM of an image")
    parser.add_argument("image", help="node:24, python:3.11, registry:port/repo:tag, oci:DIR ...")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS... (default: the image's)")
    parser.add_argument("-i", "--interactive", action="store_true", help="keep stdin open (piped stdin always is)")
    parser.add_argument("-t", "--tty", action="store_true", help="give the command a terminal")
    parser.add_argument("-e", "--env", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("-w", "--workdir", help="working directory in the guest")
    parser.add_argument("-u", "--user", help="user[:group] or uid[:gid]")
    parser.add_argument("--cpus", type=int, default=1)
    parser.add_argument("-m", "--memory", type=parse_memory, default=512, help="e.g. 512m, 2g (default 512m)")
    parser.set_defaults(handler=run_run)


@contextmanager
def raw_terminal(enabled: bool) -> Iterator[None]:
    if not enabled:
        yield
        return
    saved = termios.tcgetattr(0)
    try:
        tty.setraw(0)
        yield
    finally:
        termios.tcsetattr(0, termios.TCSADRAIN, saved)


async def run_command(args: argparse.Namespace) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    image = await pull(args.image)
    argv = image.config.command_for(command)
    if not argv:
        raise CellvmError(f"{args.image} has no ENTRYPOINT or CMD: give a command after --")
    forward_stdin = args.interactive or not os.isatty(0)
    use_tty = args.tty and os.isatty(0)
    cols, rows = os.get_terminal_size(0) if use_tty else (80, 24)

    async with Sandbox(image, cpus=args.cpus, memory_mib=args.memory, env=parse_env(args.env),
                       workdir=args.workdir, user=args.user) as sandbox:  # fmt: skip
        async with sandbox.process(*argv, stdin=forward_stdin, pty=use_tty, rows=rows, cols=cols) as process:

            async def copy_stdin() -> None:
                while data := await anyio.to_thread.run_sync(os.read, 0, 65536, abandon_on_cancel=True):
                    await process.stdin.send(data)
                await process.stdin.close()

            with raw_terminal(use_tty):
                async with anyio.create_task_group() as tasks:
                    if forward_stdin:
                        tasks.start_soon(copy_stdin)
                    async for chunk in process:
                        out = sys.stdout.buffer if chunk.stream == "stdout" else sys.stderr.buffer
                        out.write(chunk.data)
                        out.flush()
                    tasks.cancel_scope.cancel()
            status = await process.wait()
    if status.signal:
        return 128 + status.signal
    return status.exit_code


def run_run(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    return anyio.run(run_command, args)
