# Copyright (c) mmcbn contributors. All rights reserved.
"""Which norm at batch 2? GroupNorm, GN + weight standardization, GN with
weight-centred convolutions, MABN, and CBN with and without weight
reparametrization, each at its own tuned learning rate, on the photo-crops
task of ``small_batch_photos.py`` (the protocol of ``upstream_study.py``:
tuning on a validation split carved from the training crops, then paired
test seeds).

Rows (batch 2 unless named; window 8 and burn-in 25% for CBN):

- BN b2, BN b32, GN b2 (8 groups);
- GN+WS: GN behind mmcv's ``ConvWS2d`` (Qiao et al. 2019);
- GN+WC / BN+WC: GN or BN behind weight-centred convolutions
  (``mmcbn.ConvWC``);
- MABN: ``mmcbn.MABN2d`` behind ``ConvWC`` (the paper's recipe), buffer 16
  (= 32 / 2), moving averages after 100 iterations, renormalization after
  1000 (of 2520), r clipped to [1/5, 5], momentum 0.02;
- CBN (the default, ``compensate=True``), CBN+WC, CBN+WS;
- CBN-up-w (``compensate='upstream'``, window running statistics), with WC
  and WS;
- the ceiling (the samples of the last 7 iterations re-run through the
  current network with the current batch; BN over 16), also behind WS and
  WC convolutions;
- a probe (``sma_norm.py``): moving averages over 16 iterations of the
  forward and backward statistics, centred or not (not centred is MABN
  without its renormalization factor), no compensation.

Every BN-style row is also scored with its running statistics re-estimated
exactly (``mmcbn.precise_stats``): from the whole training set in one pass,
and from 200 training batches of the run's size (what ``PreciseStatsHook``
does in a training run).

    python benchmarks/batch2_study.py --tune-seeds 0 1 2 --ceiling-lr 0.1
    python benchmarks/batch2_study.py --quick

Writes ``batch2_study.json`` and ``batch2_study.png`` into ``--out``;
finished runs are kept in ``work_dirs/batch2_study/runs.jsonl`` (split a
study over processes with ``--methods``).
"""
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from upstream_study import BURNIN, WINDOW, run_study  # noqa: E402

#: MABN's settings for 2520 iterations at batch 2 (paper: buffer = the
#: batch to simulate / the batch per GPU; ~100 iterations before the
#: moving averages, ~1000 before the renormalization).
MABN_KWARGS = dict(buffer_size=16, sma_warmup=100, renorm_warmup=1000,
                   r_max=5.0, momentum=0.02)
#: The peers a user would pick instead of CBN at batch 2.
PEERS = ('GN b2', 'GN+WS b2', 'GN+WC b2', 'MABN b2')


def methods():
    """The compared methods (``small_batch_photos`` run specs)."""
    cbn = dict(norm='cbn', batch=2, burnin=BURNIN)
    up = dict(window=WINDOW, compensate='upstream',
              running_stats_from='window', upstream_form='exact')
    gn = dict(norm='gn', batch=2, kwargs=dict(groups=8))
    out = [
        dict(name='BN b2', norm='bn', batch=2, kwargs={}),
        dict(name='BN b32', norm='bn', batch=32, kwargs={}),
        dict(gn, name='GN b2'),
        dict(gn, name='GN+WS b2', conv='ws'),
        dict(gn, name='GN+WC b2', conv='wc'),
        dict(name='BN+WC b2', norm='bn', batch=2, kwargs={}, conv='wc'),
        dict(name='MABN b2', norm='mabn', batch=2, kwargs=MABN_KWARGS,
             conv='wc'),
        dict(cbn, name='CBN b2', kwargs=dict(window=WINDOW)),
        dict(cbn, name='CBN+WC b2', kwargs=dict(window=WINDOW), conv='wc'),
        dict(cbn, name='CBN+WS b2', kwargs=dict(window=WINDOW), conv='ws'),
        dict(cbn, name='CBN-up-w b2', kwargs=up),
        dict(cbn, name='CBN-up-w+WC b2', kwargs=up, conv='wc'),
        dict(cbn, name='CBN-up-w+WS b2', kwargs=up, conv='ws'),
        dict(name='ceiling b2', norm='bn', batch=2, kwargs={},
             ceiling=WINDOW),
        # what a perfect compensation would give behind reparametrized
        # convolutions: is BN over 16 images there above the peers?
        dict(name='ceiling+WS b2', norm='bn', batch=2, kwargs={},
             ceiling=WINDOW, conv='ws'),
        dict(name='ceiling+WC b2', norm='bn', batch=2, kwargs={},
             ceiling=WINDOW, conv='wc'),
        # the probe (sma_norm.py): moving averages over 16 iterations of the
        # forward and backward statistics, no compensation, centred or not
        # (not centred: MABN without r)
        dict(name='SMA-BN centred+WC b2', norm='sma', batch=2,
             kwargs=dict(window=16, warmup=100, center=True), conv='wc'),
        dict(name='SMA-BN uncentred+WC b2', norm='sma', batch=2,
             kwargs=dict(window=16, warmup=100, center=False), conv='wc'),
    ]
    for spec in out:
        spec.setdefault('burnin', None)
        spec.setdefault('data', 'photos')
        spec.setdefault('conv', None)
    return out


def best_peer(summary):
    """The strongest peer in the table (mean test accuracy)."""
    peers = [p for p in PEERS if p in summary]
    return max(peers, key=lambda p: summary[p]['acc_mean']) if peers \
        else None


def pairs(summary):
    """The comparisons: every CBN row against each peer, BN at batch 32 and
    the default CBN; the levers (WC, WS, the peers' reparametrizations);
    the same with re-estimated statistics for the BN-style rows."""
    cbns = [n for n in summary if n.startswith('CBN')]
    out = []
    for name in cbns:
        out += [(name, peer) for peer in PEERS]
        out += [(name, 'BN b32')]
        if name != 'CBN b2':
            out.append((name, 'CBN b2'))
    out += [('CBN+WC b2', 'CBN b2'), ('CBN+WS b2', 'CBN b2'),
            ('CBN-up-w+WC b2', 'CBN-up-w b2'),
            ('CBN-up-w+WS b2', 'CBN-up-w b2'), ('GN+WS b2', 'GN b2'),
            ('GN+WC b2', 'GN b2'), ('MABN b2', 'GN b2'),
            ('BN+WC b2', 'BN b2'), ('ceiling b2', 'GN b2'),
            ('ceiling+WS b2', 'GN+WS b2'), ('ceiling+WC b2', 'GN+WC b2'),
            ('ceiling+WS b2', 'ceiling b2'),
            ('SMA-BN uncentred+WC b2', 'SMA-BN centred+WC b2'),
            ('MABN b2', 'SMA-BN uncentred+WC b2'),
            ('CBN-up-w+WC b2', 'SMA-BN centred+WC b2')]
    peer = best_peer(summary)
    for name in cbns + ['MABN b2', 'BN b32', 'ceiling b2', 'ceiling+WS b2',
                        'ceiling+WC b2']:
        if peer is not None:
            out.append((name, peer, 'accs_pop'))
        out.append((name, name, 'accs_pop', 'accs'))
    unique = []
    for p in out:
        same_row = p[0] == p[1] and len(p) < 4
        if p not in unique and not same_row:
            unique.append(p)
    return unique


def main(argv=None):
    return run_study(argv, __doc__, 'batch2_study', methods(), pairs,
                     'photo crops, batch 2, which norm, tuned lr')


if __name__ == '__main__':
    main()
