# Copyright (c) mmcbn contributors. All rights reserved.
"""What each lever of the upstream compensation costs in accuracy, on the
photo crops at batch 2 (the protocol of ``upstream_study.py``).

Every lever row runs at CBN-up-w's tuned base learning rate (``--lr``,
0.1 on the batch-2 study's machine) without tuning; CBN-w (the producer's
compensation with window running statistics: the baseline of the upstream
gain) and CBN-up-w are tuned as in ``batch2_study.py`` (their runs are
shared with it through ``--work-dir work_dirs/batch2_study``). Their cost
in a ResNet-50 is ``train_speed.py``'s ``CBN w8 upstream *`` variants.

Levers (window 8, burn-in 25%, window running statistics):

- ``fast``: ``upstream_form='fast'`` (:mod:`mmcbn.upstream_fast`): the
  mean term as vectors (exact for the bilinear model), the variance term
  diagonal and calibrated;
- ``mean``: the fast mean term alone (what the variance term adds);
- ``feed1``: the nearest feeding norm only (``upstream_feeding=1``);
- ``s2``: ``moment_stride=2`` (every derivative convolution on a quarter
  of the output positions);
- ``bf16``: the derivative matrices stored in bfloat16;
- ``fast+WC``: the fast form behind weight-centred convolutions (at
  CBN-up-w+WC's tuned rate, 0.2), against batch2_study's CBN-up-w+WC.

    python benchmarks/upstream_levers.py --seeds 0 1 2 \\
        --work-dir work_dirs/batch2_study --tune-seeds 0 1 2
    python benchmarks/upstream_levers.py --quick

Writes ``upstream_levers.json`` and ``.png`` into ``--out``.
"""
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from upstream_study import BURNIN, WINDOW, run_study  # noqa: E402

#: CBN-up-w's tuned base learning rate in batch2_study (AMD EPYC), and
#: CBN-up-w+WC's.
LEVER_LR = 0.1
WC_LR = 0.2
#: The levers: name -> CBN options on top of ``compensate='upstream'``.
LEVERS = {
    'fast': dict(upstream_form='fast'),
    'mean': dict(upstream_form='mean'),
    'feed1': dict(upstream_feeding=1, upstream_form='exact'),
    'fast feed1': dict(upstream_form='fast', upstream_feeding=1),
    's2': dict(moment_stride=2, upstream_form='exact'),
    'fast s2': dict(upstream_form='fast', moment_stride=2),
    'bf16': dict(store_dtype='bfloat16', upstream_form='exact'),
}


def methods():
    """CBN-w, CBN-up-w and each lever (``small_batch_photos`` specs)."""
    base = dict(norm='cbn', batch=2, burnin=BURNIN, data='photos',
                conv=None)
    # (the exact form: what compensate='upstream' was before the levers)
    up = dict(window=WINDOW, compensate='upstream',
              running_stats_from='window', upstream_form='exact')
    out = [dict(base, name='CBN-w b2',
                kwargs=dict(window=WINDOW, running_stats_from='window')),
           dict(base, name='CBN-up-w b2', kwargs=up),
           # (batch2_study's run, shared through the work dir)
           dict(base, name='CBN-up-w+WC b2', kwargs=up, conv='wc',
                lrs=[WC_LR], tune=False)]
    for name, opts in LEVERS.items():
        out.append(dict(base, name=f'CBN-up-w {name} b2',
                        kwargs=dict(up, **opts), lrs=[LEVER_LR],
                        tune=False))
    # the fast form behind weight-centred convolutions, at the exact form's
    # tuned rate there (batch2_study's CBN-up-w+WC b2)
    out.append(dict(base, name='CBN-up-w fast+WC b2', conv='wc',
                    kwargs=dict(up, upstream_form='fast'), lrs=[WC_LR],
                    tune=False))
    return out


def pairs(summary):
    """Every upstream row against CBN-w (the gain) and CBN-up-w (the
    fast form behind WC against the exact one there)."""
    out = []
    for name in summary:
        if name.startswith('CBN-up-w') and '+WC' not in name:
            out.append((name, 'CBN-w b2'))
            if name != 'CBN-up-w b2':
                out.append((name, 'CBN-up-w b2'))
    if 'CBN-up-w+WC b2' in summary:
        out.append(('CBN-up-w fast+WC b2', 'CBN-up-w+WC b2'))
    return out


def main(argv=None):
    return run_study(argv, __doc__, 'upstream_levers', methods(), pairs,
                     'photo crops, batch 2, upstream levers')


if __name__ == '__main__':
    main()
