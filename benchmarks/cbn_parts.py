# Copyright (c) mmcbn contributors. All rights reserved.
"""Where a CBN training step spends its extra time, part by part, and the
floor of each part, measured on the same tensors in the same process.

CBN's work beyond a plain training step falls into parts, each with a floor
(issue 9):

================  ========================================================
part              floor
================  ========================================================
normalization     BN's forward + backward (``F.batch_norm``, training
                  mode) on the same tensors
recording         one conv weight-gradient per layer (the d nu / dW
                  product, ``mmcbn.binding._conv_weight_grad``, strided
                  like the layer's ``moment_stride``) plus one write of it
                  (a ``copy_`` of its bytes, in the storage dtype)
compensation      a plain ``copy_`` of the stored window entries (every
                  buffer of every window, the same bytes)
window gradient   a plain ``copy_`` of the stored derivatives it reads
                  (``pbar`` and ``d nu / dW`` of every window), the one
                  extra pass over the window the window rule needs
upstream          (``compensate='upstream'``) one conv weight-gradient
                  per layer over the feeding norms' directions ``[a xhat,
                  a]`` (the derivatives of the second moment in their
                  gamma and beta)
everything else   none: Python and bookkeeping (total extra minus the
                  parts above)
================  ========================================================

:class:`PartProbe` instruments mmcbn's hot path *from the outside* (it
wraps module-level functions and methods in this process; nothing in
mmcbn changes): it times each part inside real training steps and, in one
capture step, keeps each call's inputs. :func:`replay_parts` then times
each part again on those inputs next to its floor, round-robin.

Which mmcbn function belongs to which part:

* normalization: ``batch_stats`` (the current batch's statistics, which
  BN's kernel computes inside its forward), ``window_norm`` (forward) and
  ``_WindowNorm.backward``;
* recording: ``make_record`` (patch mean, d nu / dW, folding the old
  weight into constants) and ``WindowState.push`` (the ring-buffer write);
* compensation: ``WindowState.compensated`` (every stored entry read
  once, ``G . W_now``, and the lag matching);
* window gradient (``window_grad=True``): ``window_grad_terms`` (in the
  forward: every stored derivative read once more, weighted by the
  entries' weights) and ``_window_param_grads`` (in the backward: two
  weight-sized element-wise ops). Both run inside the normalization's
  calls and are subtracted from it.
* upstream (``compensate='upstream'``): finding the feeding norms
  (``find_feeding``), collecting their state (``upstream_now``), and,
  inside the other parts (subtracted from them), recording the
  derivatives (``normalized_inputs``, ``Producer.upstream_grads``,
  ``feeding_state``), applying them (``upstream_shift``, ``_block_dot``)
  and their window gradient (``_upstream_terms``).
"""
import dataclasses
from types import SimpleNamespace

import torch
import torch.nn.functional as F

import mmcbn.binding as binding_module
import mmcbn.cbn as cbn_module
import mmcbn.functional as functional
import mmcbn.tracking as tracking_module
import mmcbn.compensation as comp_module
import mmcbn.window as window_module
from common import time_round_robin
from mmcbn.binding import Binding, Producer, _conv_weight_grad

PARTS = ('normalization', 'recording', 'compensation', 'window gradient',
         'upstream')
#: clock name -> part
_PART_OF = {
    'norm.batch_stats': 'normalization',
    'norm.forward': 'normalization',
    'norm.backward': 'normalization',
    'record.make': 'recording',
    'record.push': 'recording',
    'compensation': 'compensation',
    'window_grad.terms': 'window gradient',
    'window_grad.params': 'window gradient',
    'upstream.bind': 'upstream',
    'upstream.now': 'upstream',
}
#: Timed calls of the upstream part that run inside another part's call.
_NESTED_UPSTREAM = 'upstream.'



class PartProbe:
    """Times (and optionally captures) CBN's parts in the steps run inside
    ``with probe:``.

    Args:
        clock (DeviceClock): Where time is measured (CPU or CUDA events).
        capture (bool): Keep every call's inputs for :func:`replay_parts`
            (the copies cost time: do not time a capture step).
    """

    def __init__(self, clock, capture=False):
        self.clock = clock
        self.capture = capture
        self.norms, self.records, self.pushes, self.comps = [], [], [], []
        self.wgrads, self.upstreams = [], []
        self._saved = []
        self._stack = []

    # ------------------------------------------------------------ patching
    def _timed(self, name, fn, keep=None, detail=False, nested=False):
        """``fn`` timed under ``name``; a ``detail`` is named after the
        timed call it runs in (``'record.make/row_dot'``) and counts in
        no part total (it is inside one)."""
        clock, stack = self.clock, self._stack

        def wrapped(*args, **kwargs):
            if keep is not None:
                keep(*args, **kwargs)
            full = f'{stack[-1] if stack else "-"}/{name}' if detail or (
                nested and stack) else name
            stack.append(full)
            token = clock.start()
            try:
                out = fn(*args, **kwargs)
            finally:
                clock.stop(token, full)
                stack.pop()
            return out

        return wrapped

    def _patch(self, owner, attr, wrapped, static=False):
        self._saved.append((owner, attr, owner.__dict__[attr]))
        setattr(owner, attr, staticmethod(wrapped) if static else wrapped)

    def __enter__(self):
        cap = self.capture
        self._patch(cbn_module, 'batch_stats',
                    self._timed('norm.batch_stats', cbn_module.batch_stats))
        self._patch(
            cbn_module, 'window_norm',
            self._timed('norm.forward', cbn_module.window_norm,
                        self._keep_norm if cap else None))
        self._patch(functional._WindowNorm, 'backward',
                    self._timed('norm.backward',
                                functional._WindowNorm.backward),
                    static=True)
        self._patch(
            cbn_module, 'make_record',
            self._timed('record.make', cbn_module.make_record,
                        self._keep_record if cap else None))
        state = window_module.WindowState
        self._patch(
            state, 'push',
            self._timed('record.push', state.push,
                        self._keep_push if cap else None))
        self._patch(
            state, 'compensated',
            self._timed('compensation', state.compensated,
                        self._keep_comp if cap else None))
        self._patch(
            cbn_module, 'window_grad_terms',
            self._timed('window_grad.terms', cbn_module.window_grad_terms,
                        self._keep_wgrad if cap else None))
        self._patch(
            functional, '_window_param_grads',
            self._timed('window_grad.params',
                        functional._window_param_grads))
        # the upstream part (compensate='upstream')
        self._patch(tracking_module, 'find_feeding',
                    self._timed('upstream.bind', tracking_module.find_feeding))
        self._patch(cbn_module, 'upstream_now',
                    self._timed('upstream.now', cbn_module.upstream_now))
        for owner, attr, keep in (
                (comp_module, 'normalized_inputs', None),
                (comp_module, 'feeding_state', None),
                (Producer, 'upstream_grads',
                 self._keep_upstream if cap else None),
                (comp_module, 'upstream_shift', None),
                (comp_module, '_block_dot', None),
                (comp_module, '_upstream_terms', None),
                # upstream_form='fast' (timed in the step, not replayed)
                (comp_module, 'fast_record', None),
                (comp_module, 'fast_shift', None),
                (comp_module, 'fast_grad', None)):
            self._patch(owner, attr, self._timed(
                f'upstream.{attr.lstrip("_")}', getattr(owner, attr), keep,
                nested=True))
        # details inside the parts (where the recording and compensation
        # time goes)
        for owner, attr in ((Producer, 'patch_mean'),
                            (Producer, 'moment_weight_grad'),
                            (binding_module, '_conv_weight_grad'),
                            (comp_module, '_row_dot'),
                            (comp_module, '_group_dot')):
            self._patch(owner, attr,
                        self._timed(attr.lstrip('_'), getattr(owner, attr),
                                    detail=True))
        return self

    def __exit__(self, *exc):
        for owner, attr, value in reversed(self._saved):
            setattr(owner, attr, value)
        self._saved = []

    # ----------------------------------------------------------- capturing
    def _keep_norm(self, x, weight, bias, cur_mean, cur_var, hist_count,
                   hist_mean, hist_var, eps, source=None, window_grad=None):

        def leaf(t):
            return None if t is None else \
                t.detach().clone().requires_grad_()

        self.norms.append(
            dict(x=leaf(x), weight=leaf(weight), bias=leaf(bias),
                 cur_mean=cur_mean.clone(), cur_var=cur_var.clone(),
                 hist_count=hist_count.clone(), hist_mean=hist_mean.clone(),
                 hist_var=hist_var.clone(), eps=eps))

    def _keep_record(self, binding, x, mean, var, compensate,
                     moment_stride=1, phase=(), derivatives=False,
                     upstream_form='exact'):
        prod = binding.producer
        if prod is not None and binding.status == 'bound':
            # the autograd node's saved input is freed by backward: keep it
            inp = prod._input(x.dtype).clone()
            node = SimpleNamespace(_saved_input=inp, _saved_mat1=inp)
            if prod.kind == 'conv':
                node._saved_weight = prod.node._saved_weight.detach()
            else:
                node._saved_mat2 = prod.node._saved_mat2.detach()
            prod = dataclasses.replace(prod, node=node)
        self.records.append(
            # (without its feeding norms: the upstream part is replayed
            # on its own)
            dict(binding=Binding(binding.status, prod, binding.reason),
                 x=x.clone(), mean=mean.clone(), var=var.clone(),
                 compensate=compensate, stride=moment_stride, phase=phase,
                 derivatives=derivatives))

    def _keep_upstream(self, prod, u, x, centered, stride=1, phase=(),
                       affine=None):
        node = SimpleNamespace(_saved_input=prod._input(x.dtype).clone(),
                               _saved_weight=prod.node._saved_weight.detach()
                               .clone() if prod.kind == 'conv' else None)
        if prod.kind == 'linear':
            node._saved_mat1 = node._saved_input
            node._saved_mat2 = prod.node._saved_mat2.detach().clone()
        self.upstreams.append(
            dict(prod=dataclasses.replace(prod, node=node), u=u.clone(),
                 x=x.clone(), centered=centered.clone(), stride=stride,
                 phase=phase, affine=affine))

    def _keep_push(self, state, iteration, key, record, count, cycle=None,
                   feed=None):
        self.pushes.append(
            dict(capacity=state.capacity, store_dtype=state.store_dtype,
                 iteration=iteration, key=key, count=count))

    def _keep_comp(self, state, iteration, lags, key, weight, bias,
                   cycle=None, upstream=None, feed=None):
        # replayed after this step's record was pushed: one iteration
        # (and accumulation cycle) later, the window holds as many entries
        # as it held here
        self.comps.append(
            dict(state=state, iteration=iteration + 1, lags=lags, key=key,
                 weight=weight, bias=bias,
                 cycle=None if cycle is None else cycle + 1))

    def _keep_wgrad(self, slots, match, lag_weight, lag_mean, lag_pos,
                    lag_raw_mean, mean_bar, need_weight, need_upstream=False,
                    **kwargs):
        # the ring's buffers are written over by the step's push: copy
        # (the fast upstream form's terms also need the call's Upstream)
        self.wgrads.append(
            dict(slots={k: v.clone() for k, v in slots.items()},
                 args=(match, lag_weight, lag_mean, lag_pos, lag_raw_mean,
                       mean_bar, need_weight, need_upstream),
                 upstream=kwargs.get('upstream')))

    # -------------------------------------------------------------- totals
    def step_parts(self):
        """Seconds of each part in the steps run so far (since the last
        call), the calls of each timed function, and the seconds of each
        timed function and detail; synchronizes the device once."""
        totals = self.clock.totals()
        out = {part: [0.0, 0] for part in PARTS}
        calls, details = {}, {}
        for name, (seconds, n) in totals.items():
            details[name] = seconds
            parent, _, last = name.rpartition('/')
            if last.startswith(_NESTED_UPSTREAM) and parent in _PART_OF:
                # an upstream call inside another part's call
                out['upstream'][0] += seconds
                out[_PART_OF[parent]][0] -= seconds
                calls[last] = calls.get(last, 0) + n
                continue
            if '/' in name:
                continue
            out[_PART_OF[name]][0] += seconds
            calls[name] = n
        # the window gradient runs inside the normalization's calls
        out['normalization'][0] -= out['window gradient'][0]
        return {k: tuple(v) for k, v in out.items()}, calls, details


def _nbytes(t):
    return t.numel() * t.element_size()


class _Scratch:
    """Reused write targets, one flat buffer per dtype (a floor's ``copy_``
    writes the same bytes without holding a second window in memory)."""

    def __init__(self, device):
        self.device = device
        self.buffers = {}

    def like(self, t, dtype=None):
        dtype = dtype or t.dtype
        buf = self.buffers.get(dtype)
        if buf is None or buf.numel() < t.numel():
            buf = torch.empty(t.numel(), dtype=dtype, device=self.device)
            self.buffers[dtype] = buf
        return buf[:t.numel()].view(t.shape)


def replay_functions(probe, device):
    """The six replays (each part and its floor), on the captured inputs.

    Returns:
        tuple: ``(fns, info)``; ``fns`` maps ``'<part>'`` and
        ``'<part>_floor'`` to a function running it for every captured
        call; ``info`` holds byte counts and the captured convs.
    """
    assert len(probe.records) == len(probe.pushes)
    scratch = _Scratch(device)
    # ---- normalization: CBN's vs BN's forward + backward
    norms = []
    gen = torch.Generator().manual_seed(0)
    for c in probe.norms:
        x = c['x']
        inputs = tuple(t for t in (x, c['weight'], c['bias'])
                       if t is not None)
        grad = torch.randn(x.shape, generator=gen).to(device, x.dtype)
        channels = x.shape[1]
        norms.append(dict(
            c, inputs=inputs, grad=grad,
            running_mean=torch.zeros(channels, device=device),
            running_var=torch.ones(channels, device=device)))

    def normalization():
        for c in norms:
            mean, var = functional.batch_stats(c['x'])
            y, _ = functional.window_norm(
                c['x'], c['weight'], c['bias'], mean, var, c['hist_count'],
                c['hist_mean'], c['hist_var'], c['eps'])
            torch.autograd.grad(y, c['inputs'], c['grad'])

    def normalization_floor():
        for c in norms:
            y = F.batch_norm(c['x'], c['running_mean'], c['running_var'],
                             c['weight'], c['bias'], True, 0.1, c['eps'])
            torch.autograd.grad(y, c['inputs'], c['grad'])

    # ---- recording: make_record + push vs weight-gradient + one write
    records = []
    written = 0
    convs = []
    for rec, push in zip(probe.records, probe.pushes):
        state = window_module.WindowState(push['capacity'],
                                          push['store_dtype'])
        entry = dict(rec, push=push, state=state, floor=None)
        prod = rec['binding'].producer
        if rec['binding'].status == 'bound' and prod.weight is not None and \
                rec['compensate']:
            x = rec['x']
            inp = prod._input(x.dtype)
            if prod.kind == 'conv':
                if rec['stride'] > 1:
                    fx, finp, conv = prod._subsampled(x, inp, rec['stride'],
                                                      rec['phase'])
                else:
                    fx, finp, conv = x, inp, prod
                    convs.append((x, inp, prod))
                entry['floor'] = ('conv', fx, finp, prod.weight.shape, conv)
                rows = prod.weight.shape[0]
                numel = prod.weight.numel()
            else:
                entry['floor'] = ('linear', x, inp)
                rows, numel = x.shape[1], x.shape[1] * inp.shape[1]
            store = push['store_dtype'] or x.dtype
            entry['write_shape'] = (rows, numel // rows)
            entry['store_dtype'] = store
            written += numel * torch.empty((), dtype=store).element_size()
        records.append(entry)
    iteration = [10**6]

    def recording():
        iteration[0] += 1
        for c in records:
            record = cbn_module.make_record(c['binding'], c['x'], c['mean'],
                                            c['var'], c['compensate'],
                                            c['stride'], c['phase'],
                                            c['derivatives'])
            # one cycle per iteration: every replayed entry is a past one
            c['state'].push(iteration[0], c['push']['key'], record,
                            c['push']['count'], iteration[0])

    def recording_floor():
        for c in records:
            floor = c['floor']
            if floor is None:
                continue
            if floor[0] == 'conv':
                _, fx, finp, shape, conv = floor
                grad = _conv_weight_grad(fx, finp, shape, conv)
            else:
                _, fx, finp = floor
                grad = torch.mm(fx.t(), finp)
            grad = grad.reshape(c['write_shape'])
            scratch.like(grad, c['store_dtype']).copy_(grad)

    # ---- compensation: compensated() vs a copy of the same bytes
    comps = probe.comps
    comp_bytes = sum(_nbytes(b) for c in comps
                     for b in c['state']._buffers.values())

    def compensation():
        for c in comps:
            c['state'].compensated(c['iteration'], c['lags'], c['key'],
                                   c['weight'], c['bias'], c['cycle'])

    def compensation_floor():
        for c in comps:
            for buf in c['state']._buffers.values():
                scratch.like(buf).copy_(buf)

    # ---- window gradient: its terms vs a copy of the derivatives it reads
    wgrads = probe.wgrads
    wgrad_bytes = sum(_nbytes(c['slots'][name]) for c in wgrads
                      for name in ('pbar', 'var_grad') if name in c['slots'])

    def window_gradient():
        # (without the upstream terms: they are the upstream part's)
        for c in wgrads:
            comp_module.window_grad_terms(c['slots'], *c['args'][:-1],
                                          False)

    def window_gradient_floor():
        for c in wgrads:
            for name in ('pbar', 'var_grad'):
                if name in c['slots']:
                    buf = c['slots'][name]
                    scratch.like(buf).copy_(buf)

    # ---- upstream: its derivatives vs one weight-gradient conv over the
    # directions (the feeding norms' [a xhat, a])
    upstreams = probe.upstreams

    def upstream():
        # its derivatives (recording) and its window gradient terms
        for c in upstreams:
            c['prod'].upstream_grads(c['u'], c['x'], c['centered'],
                                     c['stride'], c['phase'], c['affine'])
        for c in wgrads:
            if c['args'][-1]:
                args = c['args'][:-2] + (False, True)
                comp_module.window_grad_terms(c['slots'], *args,
                                              upstream=c['upstream'])

    def upstream_floor():
        for c in upstreams:
            prod, u, x = c['prod'], c['u'], c['centered']
            if prod.kind == 'conv':
                shape = prod.node._saved_weight.shape
                _conv_weight_grad(x, u, (shape[0], u.shape[1]) +
                                  tuple(shape[2:]), prod)
            else:
                torch.mm(x.t(), u)

    fns = dict(normalization=normalization,
               normalization_floor=normalization_floor,
               recording=recording, recording_floor=recording_floor,
               compensation=compensation,
               compensation_floor=compensation_floor,
               upstream=upstream, upstream_floor=upstream_floor,
               **{'window gradient': window_gradient,
                  'window gradient_floor': window_gradient_floor})
    info = dict(
        norm_calls=len(norms), record_calls=len(records),
        weight_grad_products=sum(c['floor'] is not None for c in records),
        recording_floor_write_bytes=written,
        compensation_calls=len(comps),
        compensation_floor_bytes=comp_bytes, window_grad_calls=len(wgrads),
        window_gradient_floor_bytes=wgrad_bytes,
        upstream_calls=len(upstreams), convs=convs)
    return fns, info


def replay_parts(clock, probe, device, reps, warmup=1):
    """Median seconds of each part and its floor, round-robin.

    Returns:
        tuple: ``(times, info)`` as in :func:`replay_functions`.
    """
    fns, info = replay_functions(probe, device)
    return time_round_robin(clock, fns, reps, warmup), info


def part_table(step_extra, replay, in_step, limit=1.2):
    """Per-part numbers of one variant (milliseconds).

    Args:
        step_extra (float): CBN step minus BN step (s), timed in pairs
            (a BN step, then an instrumented CBN step).
        replay (dict): :func:`replay_parts` medians (s).
        in_step (dict): part -> seconds inside one step (instrumented).
        limit (float): The issue's goal for part / floor.

    Returns:
        dict: ``parts`` (per part: ``cbn_ms``, ``floor_ms``, ``ratio``,
        ``within``, ``in_step_ms``), ``else_ms`` and the overall ratios.
    """
    ms = {k: 1e3 * v for k, v in replay.items()}
    parts = {}
    for part in PARTS:
        cbn, floor = ms[part], ms[f'{part}_floor']
        ratio = cbn / floor if floor > 0 else None
        parts[part] = dict(cbn_ms=cbn, floor_ms=floor, ratio=ratio,
                           within=ratio is not None and ratio <= limit,
                           in_step_ms=1e3 * in_step[part])
    extra_ms = 1e3 * step_extra
    norm_extra = ms['normalization'] - ms['normalization_floor']
    beyond = ('recording', 'compensation', 'window gradient', 'upstream')
    else_ms = extra_ms - norm_extra - sum(ms[p] for p in beyond)
    else_in_step = (extra_ms - (1e3 * in_step['normalization'] -
                                ms['normalization_floor']) -
                    sum(1e3 * in_step[p] for p in beyond))
    parts['everything else'] = dict(cbn_ms=else_ms, floor_ms=0.0,
                                    in_step_ms=else_in_step)
    floors = sum(ms[f'{p}_floor'] for p in PARTS)
    work = ms['normalization'] + sum(ms[p] for p in beyond) + else_ms
    extra_floor = sum(ms[f'{p}_floor'] for p in beyond)
    return dict(
        parts=parts,
        extra_ms=extra_ms,
        # CBN's work in its layers (the four parts) / the sum of the floors
        overall_ratio=work / floors,
        overall_within=work / floors <= limit,
        # the extra over BN that the floors allow / the extra measured
        extra_efficiency=extra_floor / extra_ms if extra_ms > 0 else None,
        floor_extra_ms=extra_floor)


def detail_line(details):
    """Where recording and compensation spend their time inside a step
    (milliseconds, from :class:`PartProbe`'s details)."""

    def get(name):
        return details.get(name, 0.0)

    make, push = get('record.make'), get('record.push')
    mwg = get('record.make/moment_weight_grad')
    product = get('record.make/moment_weight_grad/conv_weight_grad')
    patch = get('record.make/patch_mean')
    fold = get('record.make/row_dot') + get('record.make/group_dot')
    comp = get('compensation')
    read = get('compensation/row_dot') + get('compensation/group_dot')
    return (f'recording {make + push:.0f} = d nu/dW products '
            f'{product:.0f} + their scaling/sub-sampling {mwg - product:.0f}'
            f' + patch mean {patch:.0f} + folding G.W_old {fold:.0f} + '
            f'other record ops {make - mwg - patch - fold:.0f} + ring write '
            f'{push:.0f}; compensation {comp:.0f} = G.W_now and '
            f'pbar.W_now {read:.0f} + lag matching {comp - read:.0f}')
