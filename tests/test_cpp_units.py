"""Builds the C++ unit tests in tests/cpp and runs them, plain and under
ThreadSanitizer.

Each variant is a CMake+Ninja build of its own under
${CELLVM_CACHE:-~/.cache/cellvm}/cpp-tests/<variant>, kept between runs so an
unchanged tree rebuilds nothing. The build needs only csrc/ headers and a
compiler (scripts/apt/cpp-tests.txt), never the Python extension.
"""

import fcntl
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SOURCE = REPO / "tests" / "cpp"
CACHE = Path(os.environ.get("CELLVM_CACHE") or Path.home() / ".cache" / "cellvm") / "cpp-tests"

VARIANTS = {
    "plain": [],
    "tsan": ["-DCELLVM_SANITIZER=thread"],
}
# halt_on_error: the first report fails the run; exitcode: it fails even when
# the tests themselves passed.
SANITIZER_ENV = {"TSAN_OPTIONS": "halt_on_error=1 exitcode=66 second_deadlock_stack=1"}
RUN_TIMEOUT_S = 300  # the tests take seconds; their own watchdog fires first


def _run(command, **kwargs):
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)
    if result.returncode != 0:
        pytest.fail(f"{' '.join(map(str, command))} exited {result.returncode}:\n{result.stdout}", pytrace=False)
    return result.stdout


def _configured_source(build: Path):
    cache = build / "CMakeCache.txt"
    if not cache.exists():
        return None
    for line in cache.read_text().splitlines():
        if line.startswith("CMAKE_HOME_DIRECTORY:"):
            return line.split("=", 1)[1]
    return None


def build(variant: str) -> Path:
    for tool in ("cmake", "ninja", "c++"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} not found: install the packages in scripts/apt/cpp-tests.txt", pytrace=False)
    build_dir = CACHE / variant
    CACHE.mkdir(parents=True, exist_ok=True)
    # Two test runs at once (two checkouts, or a developer beside CI) must
    # not drive one build directory together.
    with open(CACHE / f"{variant}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        configured = _configured_source(build_dir)
        if configured is not None and Path(configured).resolve() != SOURCE.resolve():
            shutil.rmtree(build_dir)  # a cache from another checkout: CMake refuses to reuse it
        configure = ["cmake", "-S", str(SOURCE), "-B", str(build_dir), "-G", "Ninja", *VARIANTS[variant]]
        stamp = build_dir / "cellvm-configure-command"
        if not (build_dir / "build.ninja").exists() or not stamp.exists() or stamp.read_text() != repr(configure):
            _run(configure)
            stamp.write_text(repr(configure))
        # Ninja re-runs CMake itself when CMakeLists.txt changed; -j2 leaves
        # room on a small machine.
        _run(["cmake", "--build", build_dir, "--", "-j2"])
    return build_dir


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_cpp_units(variant):
    build_dir = build(variant)
    binaries = [Path(line) for line in (build_dir / "test-binaries.txt").read_text().split() if line]
    assert binaries, "tests/cpp/CMakeLists.txt lists no test binaries"
    env = {**os.environ, **SANITIZER_ENV}
    failures = []
    for binary in binaries:
        try:
            result = subprocess.run(
                [binary],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=env,
                timeout=RUN_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired as e:
            output = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout or ""
            failures.append(f"{binary.name} ({variant}) timed out after {RUN_TIMEOUT_S} s:\n{output}")
            continue
        if result.returncode != 0:
            failures.append(f"{binary.name} ({variant}) exited {result.returncode}:\n{result.stdout}")
    if failures:
        pytest.fail("\n\n".join(failures), pytrace=False)
