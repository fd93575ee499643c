# Copyright (c) mmcbn contributors. All rights reserved.
"""Running the project's scripts from a test: a benchmark's ``--quick``
mode, or a tool loaded as a module."""
import importlib.util
import json
import math
import os
import os.path as osp
import subprocess
import sys
from types import ModuleType
from typing import Any, Optional, Tuple

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def finite(x: Any) -> bool:
    """Whether ``x`` is a finite Python number (as JSON gives them)."""
    return isinstance(x, (int, float)) and math.isfinite(x)


def run_quick(script: str,
              out,
              *extra: str,
              timeout: int = 900,
              png: bool = True) -> Tuple[Optional[dict], str]:
    """Run ``benchmarks/<script> --quick --out <out> <extra>`` in a fresh
    process (one OpenMP thread, passive waits, no display).

    Args:
        script (str): The script's file name, e.g. ``'soak.py'``.
        out (str | Path): Where it writes its JSON (and PNG).
        *extra (str): More command-line arguments.
        timeout (int): Seconds before the run counts as hung.
        png (bool): Whether the script must have written a non-trivial
            ``<stem>_quick.png``.

    Returns:
        tuple: ``(data, stdout)``: the parsed ``<stem>_quick.json`` (None if
        the script wrote none) and what it printed.
    """
    env = dict(os.environ, OMP_NUM_THREADS='1', OMP_WAIT_POLICY='PASSIVE',
               MPLBACKEND='Agg')
    proc = subprocess.run(
        [sys.executable, osp.join(ROOT, 'benchmarks', script), '--quick',
         '--out', str(out), *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stem = osp.join(str(out), script[:-3] + '_quick')
    if png:
        assert osp.getsize(stem + '.png') > 1000, stem + '.png'
    if not osp.exists(stem + '.json'):
        return None, proc.stdout
    with open(stem + '.json') as f:
        return json.load(f), proc.stdout


def load_tool(name: str) -> ModuleType:
    """``tools/<name>.py`` loaded as a module (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location(
        f'_mmcbn_tools_{name}', osp.join(ROOT, 'tools', f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
