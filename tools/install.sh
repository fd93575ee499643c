#!/usr/bin/env bash
# Create (or update) the virtual environment with mmcbn's pinned stack.
#
# Idempotent: when everything is installed it only checks, in seconds.
# mmcv 2.1.0 is compiled from its sdist with its C++ ops: `time make install`
# into a fresh .venv with an empty pip cache took 17.6 min (real) on a shared
# 2-core CPU (2026-11-25), most of it the mmcv build. pip caches the
# wheel, so a fresh virtualenv on the same machine reuses it.
#
# Usage: tools/install.sh            (VENV=path overrides .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --disable-pip-version-check -q -c requirements/constraints.txt)

check() {
  # from / so that only an installed (editable) mmcbn imports
  (cd / && MMCBN_ROOT="$OLDPWD" "$PY" - <<'PYEOF' 2>/dev/null
import importlib.metadata as md
pins = {'torch': '2.13.0', 'mmengine': '0.10.7', 'mmcv': '2.1.0',
        'mmdet': '3.3.0', 'mmsegmentation': '1.2.2'}
for name, version in pins.items():
    assert md.version(name).split('+')[0] == version, name
for name in ('ftfy', 'regex', 'pytest', 'matplotlib', 'setuptools',
             'scikit-learn', 'hypothesis', 'seaborn',
             'scikit-image'):
    md.version(name)
import setuptools
assert 77 <= int(setuptools.__version__.split('.')[0]) < 82
import mmcv.ops  # noqa: F401  (the compiled ops)
import mmdet, mmseg, mmcbn  # noqa: F401,E401
import os
assert mmcbn.__file__.startswith(os.environ['MMCBN_ROOT'] + os.sep)
PYEOF
  )
}

[ -x "$PY" ] && PY=$(cd "$(dirname "$PY")" && pwd)/python
if [ -x "$PY" ] && check; then
  echo "mmcbn environment in $VENV is up to date."
  exit 0
fi

[ -x "$PY" ] || python3 -m venv "$VENV"
PY=$(cd "$(dirname "$PY")" && pwd)/python
echo "Installing mmcbn's pinned stack into $VENV ..."
"${PIP[@]}" "setuptools>=77,<82" wheel ninja numpy
# torch first: mmcv's build imports it (the CPU wheel on disk is used when
# pip's find-links points at it).
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" mmengine==0.10.7
if ! "$PY" -c "import mmcv.ops" 2>/dev/null; then
  echo "Building mmcv 2.1.0 with its ops (slow the first time on a machine) ..."
  MAX_JOBS=${MAX_JOBS:-2} MMCV_WITH_OPS=1 "${PIP[@]}" --no-build-isolation mmcv==2.1.0
fi
"${PIP[@]}" -r requirements/runtime.txt -r requirements/tests.txt
"${PIP[@]}" --no-build-isolation --no-deps -e .

if ! "$PY" -c "import mmcv.ops" ; then
  echo "ERROR: mmcv was installed without working compiled ops (import mmcv.ops failed)." >&2
  exit 1
fi
check || { echo "ERROR: the environment in $VENV does not match the pins." >&2; exit 1; }
echo "mmcbn environment ready in $VENV."
