#!/usr/bin/env bash
# The project venv and the package itself (C++ extension + test guests),
# rebuilt only when a source file changed since the last build.
set -euo pipefail
cd "$REPO"
[ -x "$PY" ] || python3 -m venv "$VENV"
stamp="$VENV/.cellvm-build-hash"
hash=$( (cat pyproject.toml CMakeLists.txt; find csrc guest/testguests sdk -type f \( -name '*.cpp' -o -name '*.h' -o -name '*.c' -o -name '*.S' -o -name '*.ld' -o -name 'CMakeLists.txt' -o -name '*.toml' \) -print0 | sort -z | xargs -0 cat) | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" = "$hash" ] && "$PY" -c 'import cellvm._core' 2>/dev/null; then
  echo "python: up to date"
  exit 0
fi
"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install -q scikit-build-core nanobind
"$PY" -m pip install -q --no-build-isolation -e ".[test]"
echo "$hash" > "$stamp"
