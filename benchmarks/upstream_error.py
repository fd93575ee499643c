# Copyright (c) mmcbn contributors. All rights reserved.
"""What the cheaper forms of the upstream terms lose against the exact
first-order term, over a real trajectory (the photo crops at batch 2, the
protocol of ``upstream_levers.py``).

A CBN-up-w run with the exact form (``upstream_form='exact'``) also records,
for every entry, what the fast form records (``fast_record``, kept in the
ring beside the matrices). At every compensation after burn-in, for every
window entry and layer, the same displacement of the feeding norms is
applied by the exact matrices and by each cheaper form:

- ``mean, vectors``: the fast mean term (``W_t`` and patch means) against
  the matrix ``Hm`` (contracted with ``W_tau``);
- ``variance, calibrated diagonal``: the fast variance term;
- ``variance, diagonal``: the same without ``rho`` (``rho = 1``);
- ``variance, none``: no variance term (``upstream_form='mean'``).

Each reports ``sqrt(sum |cheap - exact|^2 / sum |exact|^2)`` over entries,
channels and steps, per layer and over all layers::

    python benchmarks/upstream_error.py            # one seed, ~3 min
    python benchmarks/upstream_error.py --quick

Writes ``upstream_error.json`` into ``--out``.
"""
import dataclasses
import os.path as osp
import sys
from collections import defaultdict

import torch

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from common import (Timer, benchmark_parser, machine_info,  # noqa: E402
                    markdown_table, write_json)
from small_batch_photos import (add_task_arguments, load_data,  # noqa: E402
                                train_one)
from upstream_study import BURNIN, WINDOW, quick_settings  # noqa: E402

import mmcbn.cbn as cbn_module  # noqa: E402
import mmcbn.compensation as comp_module  # noqa: E402
import mmcbn.window as window_module  # noqa: E402
from mmcbn.upstream import feeding_affine, upstream_shift  # noqa: E402
from mmcbn.upstream_fast import (fast_record, fast_shift,  # noqa: E402
                                 squared_weight)

#: CBN-up-w's tuned base learning rate (batch2_study, AMD EPYC).
LR = 0.1
#: The forms compared with the exact terms.
FORMS = ('mean, vectors', 'variance, calibrated diagonal',
         'variance, diagonal', 'variance, none')


class Recorder:
    """Shadow fast records in the ring, and the errors at each use."""

    def __init__(self):
        self.sums = defaultdict(lambda: defaultdict(float))
        self.layer_of = {}
        self._saved = []

    def __enter__(self):
        make, compensated = (cbn_module.make_record,
                             window_module.WindowState.compensated)
        recorder = self

        def make_record(binding, x, mean, var, compensate, *args, **kw):
            record = make(binding, x, mean, var, compensate, *args, **kw)
            feeding = binding.feeding
            if record.up_hm is not None:
                affine = feeding_affine(
                    feeding, mean, binding.producer.input_shape()[1]) \
                    if feeding.complete else None
                fast = fast_record(binding.producer, feeding, x, var,
                                   affine=affine)
                if fast is not None:
                    record.sh_pu, record.sh_dv, record.sh_rho = fast
            return record

        def compensated_(state, iteration, lags, key, weight, bias,
                         cycle=None, upstream=None, feed=...):
            history = compensated(state, iteration, lags, key, weight, bias,
                                  cycle, upstream, feed)
            if history is not None and upstream is not None and \
                    weight is not None and 'sh_pu' in state._buffers:
                recorder.observe(state, iteration, lags, cycle, upstream,
                                 weight)
            return history

        self._saved = [(cbn_module, 'make_record', make),
                       (window_module.WindowState, 'compensated',
                        compensated)]
        cbn_module.make_record = make_record
        window_module.WindowState.compensated = compensated_
        return self

    def __exit__(self, *exc):
        for owner, name, value in self._saved:
            setattr(owner, name, value)

    @torch.no_grad()
    def observe(self, state, iteration, lags, cycle, upstream, weight):
        buf = state._buffers
        layout = state.layout(iteration, lags, cycle)
        used = layout.match.sum(0) > 0  # (S, ): slots in the window
        shift = upstream_shift(buf['up_state'], layout.match, upstream)[0]
        exact_m = comp_module._block_dot(buf['up_hm'], shift)[used]
        exact_v = comp_module._block_dot(buf['up_hc'], shift)[used]
        slots = dict(up_pu=buf['sh_pu'], up_dv=buf['sh_dv'],
                     up_rho=buf['sh_rho'])
        w = weight.to(shift.dtype)
        now = dataclasses.replace(upstream, weight=w,
                                  weight_sq=squared_weight(w))
        fast_m, fast_v = (t[used] for t in fast_shift(slots, shift, now))
        plain_v = fast_shift(dict(slots, up_rho=torch.ones_like(
            buf['sh_rho'])), shift, now)[1][used]
        name = self.layer_of.setdefault(
            id(state), 'layer %d' % len(self.layer_of))
        sums = self.sums[name]
        sums['mean'] += float(exact_m.square().sum())
        sums['var'] += float(exact_v.square().sum())
        sums['mean, vectors'] += float((fast_m - exact_m).square().sum())
        sums['variance, calibrated diagonal'] += float(
            (fast_v - exact_v).square().sum())
        sums['variance, diagonal'] += float(
            (plain_v - exact_v).square().sum())
        sums['variance, none'] += float(exact_v.square().sum())
        sums['uses'] += 1

    def errors(self):
        """Relative rms error per form, per layer and over all."""
        out = {}
        total = defaultdict(float)
        for name, sums in self.sums.items():
            out[name] = {f: (sums[f] / max(sums['mean' if f.startswith(
                'mean') else 'var'], 1e-30))**0.5 for f in FORMS}
            out[name]['uses'] = sums['uses']
            for k, v in sums.items():
                total[k] += v
        out['all layers'] = {f: (total[f] / max(total['mean' if f.startswith(
            'mean') else 'var'], 1e-30))**0.5 for f in FORMS}
        out['all layers']['uses'] = total['uses']
        return out


def main(argv=None):
    parser = benchmark_parser(__doc__, 'tiny smoke run, for tests')
    parser.add_argument('--seed', type=int, default=0)
    add_task_arguments(parser)
    args = parser.parse_args(argv)
    args.n_val = 5
    if args.quick:
        quick_settings(args)
    torch.set_num_threads(args.threads)
    timer = Timer()
    data = load_data('photos', args)
    args.base_lr = LR
    spec = dict(name='CBN-up-w b2 (exact, with fast shadows)', norm='cbn',
                batch=2, burnin=BURNIN, conv=None, data='photos',
                kwargs=dict(window=WINDOW, compensate='upstream',
                            running_stats_from='window',
                            upstream_form='exact'))
    with Recorder() as recorder:
        run = train_one(spec, args.seed, data, args)
    errors = recorder.errors()
    rows = [[name] + [f'{e[f]:.3f}' for f in FORMS] + [str(e['uses'])]
            for name, e in errors.items()]
    table = markdown_table(['layer'] + list(FORMS) + ['uses'], rows)
    print(table)
    tag = '_quick' if args.quick else ''
    write_json(osp.join(args.out, f'upstream_error{tag}.json'), dict(
        benchmark='upstream_error', machine=machine_info(),
        config=dict({k: v for k, v in vars(args).items() if k != 'out'},
                    window=WINDOW, burnin=BURNIN, lr=LR),
        errors=errors, test_acc=run['test_acc'], table_markdown=table,
        total_seconds=timer()))
    return errors


if __name__ == '__main__':
    main()
