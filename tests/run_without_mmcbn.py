# Copyright (c) mmcbn contributors. All rights reserved.
"""Run a Python script with ``import mmcbn`` made impossible.

Usage: python run_without_mmcbn.py SCRIPT [ARGS...]

Used to run mmdet's and mmseg's own ``tools/test.py`` on published models:
stock code, torch's default weights-only loader, no mmcbn allow-list.
"""
import runpy
import sys


class _BlockMmcbn:

    def find_spec(self, name, path=None, target=None):
        if name == 'mmcbn' or name.startswith('mmcbn.'):
            raise ImportError(f'{name} is blocked: stock mmdet/mmseg only')
        return None


if __name__ == '__main__':
    sys.meta_path.insert(0, _BlockMmcbn())
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    runpy.run_path(script, run_name='__main__')
    assert 'mmcbn' not in sys.modules
