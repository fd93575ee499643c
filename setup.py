# Copyright (c) mmcbn contributors. All rights reserved.
from setuptools import find_packages, setup


def read_version() -> str:
    scope: dict = {}
    with open('mmcbn/version.py') as f:
        exec(f.read(), scope)
    return scope['__version__']


def read_requirements(path: str) -> list:
    with open(path) as f:
        lines = (line.split('#')[0].strip() for line in f)
        return [line for line in lines if line]


setup(
    name='mmcbn',
    version=read_version(),
    description='Cross-Iteration Batch Normalization for OpenMMLab 2.x',
    long_description=open('README.md').read(),
    long_description_content_type='text/markdown',
    packages=find_packages(include=['mmcbn', 'mmcbn.*']),
    python_requires='>=3.8',
    install_requires=read_requirements('requirements/runtime.txt'),
    extras_require={'tests': read_requirements('requirements/tests.txt')},
    license='Apache License 2.0',
    zip_safe=False)
