# Copyright (c) mmcbn contributors. All rights reserved.
"""Checks of CBN's constructor arguments, with errors that name the value."""
import math

import torch


def check_int(name: str, value, minimum: int, owner: str = 'CBN') -> int:
    if isinstance(value, bool) or not isinstance(value, int) \
            or value < minimum:
        raise ValueError(
            f'{owner} {name} must be an integer >= {minimum}, got {value!r}')
    return value


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f'CBN {name} must be True or False, got {value!r}')
    return value


def is_number(value) -> bool:
    """A finite int or float (not a bool)."""
    return not isinstance(value, bool) and isinstance(
        value, (int, float)) and math.isfinite(value)


#: Accepted values of ``compensate``.
COMPENSATIONS = (True, False, 'upstream')
#: Accepted values of ``running_stats_from``.
RUNNING_STATS_SOURCES = ('batch', 'window')
#: Accepted values of ``upstream_form``.
UPSTREAM_FORMS = ('exact', 'fast', 'mean')
#: Feeding norms followed at most by default, per ``upstream_form`` (the
#: fast form's terms are vectors: a ResNet-50 stage's whole residual chain).
UPSTREAM_FEEDING = {'exact': 4, 'fast': 8, 'mean': 8}
#: Accepted values of ``store_dtype`` (None: the statistics dtype).
STORE_DTYPES = {None: None, 'bfloat16': torch.bfloat16,
                'float16': torch.float16}


def check_bn_args(eps, momentum, affine, track_running_stats) -> None:
    """BatchNorm's arguments, checked before ``nn.BatchNorm`` sees them."""
    if not is_number(eps) or eps <= 0:
        raise ValueError(f'CBN eps must be a number > 0, got {eps!r}')
    if momentum is not None and (not is_number(momentum)
                                 or not 0 <= momentum <= 1):
        raise ValueError('CBN momentum must be None or a number in '
                         f'[0, 1], got {momentum!r}')
    check_bool('affine', affine)
    check_bool('track_running_stats', track_running_stats)


def check_window_args(window, burnin, burnin_by_epoch, compensate,
                      running_stats_from, moment_stride, store_dtype,
                      window_grad, upstream_form='fast',
                      upstream_feeding=None) -> bool:
    """CBN's own arguments (see :class:`mmcbn.cbn._CrossIterationBatchNorm`).

    Returns:
        bool: ``window_grad`` resolved (None follows ``compensate``).
    """
    check_int('window', window, 1)
    if check_bool('burnin_by_epoch', burnin_by_epoch):
        if not is_number(burnin) or burnin < 0:
            raise ValueError('CBN burnin (epochs) must be a number >= 0, '
                             f'got {burnin!r}')
    else:
        check_int('burnin', burnin, 0)
    if compensate not in COMPENSATIONS or not isinstance(compensate,
                                                         (bool, str)):
        raise ValueError('CBN compensate must be True, False or '
                         f"'upstream', got {compensate!r}")
    if running_stats_from is not None and (
            not isinstance(running_stats_from, str)
            or running_stats_from not in RUNNING_STATS_SOURCES):
        raise ValueError(
            'CBN running_stats_from must be None or one of '
            f'{", ".join(map(repr, RUNNING_STATS_SOURCES))}, got '
            f'{running_stats_from!r}')
    check_int('moment_stride', moment_stride, 1)
    if not (store_dtype is None or isinstance(store_dtype, str)) or \
            store_dtype not in STORE_DTYPES:  # (no hash of a list)
        raise ValueError(
            'CBN store_dtype must be None, \'bfloat16\' or '
            f"'float16', got {store_dtype!r}")
    if not isinstance(upstream_form, str) or \
            upstream_form not in UPSTREAM_FORMS:
        raise ValueError(
            'CBN upstream_form must be one of '
            f'{", ".join(map(repr, UPSTREAM_FORMS))}, got {upstream_form!r}')
    if upstream_feeding is not None:
        check_int('upstream_feeding', upstream_feeding, 1)
    if window_grad is not None and not isinstance(window_grad, bool):
        raise ValueError('CBN window_grad must be True, False or None, '
                         f'got {window_grad!r}')
    return bool(compensate) if window_grad is None else window_grad
