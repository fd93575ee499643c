# Copyright (c) mmcbn contributors. All rights reserved.
"""Find the layer that produced a CBN input, and its statistic gradients.

Stock mmdet/mmseg code only calls ``norm(x)``, so CBN finds its producer
itself: during training ``x.grad_fn`` is the producer's backward node, which
holds the producer's saved input, its convolution arguments and, through its
``AccumulateGrad`` node, the weight parameter. This needs no hooks and no
model changes. It relies on autograd node names and ``_saved_*`` attributes,
which :func:`check_autograd_introspection` verifies for the running torch.

With the producer's input patches ``p_i`` (im2col columns) and
``x_ij = W_j . p_i + b_j`` over the ``m`` positions ``i``, the closed forms
are (method document, Appendix B)::

    d mean_j / d W_j = mean_i p_i            (shared by all channels j)
    d nu_j   / d W_j = (2/m) sum_i x_ij p_i  (a conv weight gradient)
    d mean_j / d b_j = 1,   d nu_j / d b_j = 2 mean_j
"""
import functools
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

#: Autograd nodes between a parameter and the op that uses it: the cast
#: autocast inserts and the transpose inside ``F.linear``.
_PASS_THROUGH = ('ToCopyBackward0', 'TBackward0')
_NOT_A_LEAF = object()


@dataclass
class Producer:
    """A convolution or linear layer whose output a CBN layer normalizes.

    ``weight``/``bias`` hold the current values (detached) of the trainable
    parts, or None where the part is absent or frozen. Frozen parts do not
    change between iterations, so they need no compensation.
    """

    kind: str
    description: str
    key: tuple
    weight: Optional[Tensor]
    bias: Optional[Tensor]
    node: object = field(repr=False)
    #: The weight parameter itself (None for a computed weight).
    weight_param: Optional[Tensor] = field(default=None, repr=False)
    #: The live (not detached) weight and bias the producer used, where
    #: trainable: the window gradient (``window_grad``) flows into them. A
    #: computed weight (weight standardization) is the saved tensor, so
    #: its gradient reaches the parameters it was computed from.
    live_weight: Optional[Tensor] = field(default=None, repr=False)
    live_bias: Optional[Tensor] = field(default=None, repr=False)
    groups: int = 1
    stride: Tuple[int, ...] = ()
    padding: Tuple[int, ...] = ()
    dilation: Tuple[int, ...] = ()

    @property
    def trainable(self) -> bool:
        return self.weight is not None or self.bias is not None

    @property
    def pixel_patch(self) -> bool:
        """Whether an input patch is one input pixel (a linear layer, a
        1x1 convolution without padding): patch means are channel means
        over the pixels the stride reads (:meth:`read_pixels`)."""
        if self.kind != 'conv':
            return True
        kernel = self.node._saved_weight.shape[2:]
        return all(k == 1 for k in kernel) and not any(self.padding)

    def read_pixels(self, t: Tensor) -> Tensor:
        """The pixels of a producer-input-shaped ``t`` that a
        :attr:`pixel_patch` convolution reads (its stride); ``t`` itself
        otherwise."""
        if self.kind != 'conv' or not self.pixel_patch:
            return t
        return t[(slice(None), slice(None)) +
                 tuple(slice(None, None, s) for s in self.stride)]

    def saved_input(self) -> Optional[Tensor]:
        """The input autograd saved for the producer's backward (None
        where it saved none: a frozen weight), not detached."""
        name = '_saved_input' if self.kind == 'conv' else (
            '_saved_mat1' if hasattr(self.node, '_saved_mat1') else
            '_saved_self')
        return getattr(self.node, name, None)

    def _input(self, dtype: Optional[torch.dtype]) -> Tensor:
        saved = self.saved_input().detach()
        return saved if dtype is None else saved.to(dtype)

    @property
    def input_node(self):
        """The autograd node of the producer's input (None: constant)."""
        index = 1 if type(self.node).__name__ == 'AddmmBackward0' else 0
        return self.node.next_functions[index][0]

    def input_shape(self) -> Optional[Tuple[int, ...]]:
        """The shape of the producer's input (None where autograd did not
        save it: a frozen weight)."""
        saved = self.saved_input()
        return None if saved is None else tuple(saved.shape)

    def weight_value(self, dtype: torch.dtype) -> Tensor:
        """The weight the producer used (also a frozen one), detached."""
        if self.kind == 'conv':
            return self.node._saved_weight.detach().to(dtype)
        return self.node._saved_mat2.detach().t().to(dtype)

    def patch_mean(self, x: Tensor, inp: Optional[Tensor] = None) -> Tensor:
        """``d mean / d W``: the mean input patch, shape (groups, L).

        ``L`` is ``C_in / groups * prod(kernel)``; output channel ``j`` of
        group ``g`` uses row ``g``. ``inp`` replaces the producer's input
        (same shape but the channels; groups 1).
        """
        dtype = x.dtype
        if inp is None:
            inp = self._input(dtype)
        if self.kind == 'linear':
            return inp.mean(0, keepdim=True)
        m = x.numel() // x.shape[1]
        kernel = self.node._saved_weight.shape[2:]
        if self.pixel_patch:
            # 1x1 kernel: the patch is the (strided) input pixel itself
            pixels = self.read_pixels(inp)
            return pixels.mean((0, ) + tuple(range(2, inp.dim()))).reshape(
                self.groups, -1)
        # The patch mean is linear in the input: sum the batch first.
        inp = inp.sum(0, keepdim=True)
        per_group = inp.shape[1] // self.groups
        grad_out = x.new_full((1, self.groups) + tuple(x.shape[2:]), 1.0 / m)
        pbar = _conv_weight_grad(grad_out, inp,
                                 (self.groups, per_group) + tuple(kernel),
                                 self)
        return pbar.reshape(self.groups, -1)

    def mean_and_moment_grads(self, x: Tensor, mean: Tensor
                              ) -> Optional[Tuple[Tensor, Tensor]]:
        """:meth:`patch_mean` and :meth:`moment_weight_grad` (exact) of a
        convolution with one group, from one weight-gradient call: the
        output gradient holds ``x - mean`` in its first ``C`` channels and
        a constant in one more, whose row of the product is the patch sum.
        None where the separate calls are as cheap (not a convolution, or
        a 1x1 one without padding, whose patch mean needs no product).

        Args:
            x (Tensor): The producer's output (the CBN input).
            mean (Tensor): Its per-channel mean.

        Returns:
            tuple[Tensor]: ``pbar`` (1, L) and ``Gc`` (C, L).
        """
        if self.kind != 'conv' or self.groups != 1:
            return None
        saved = self.node._saved_weight
        if self.pixel_patch:
            return None
        inp = self._input(x.dtype)
        channels = x.shape[1]
        m = x.numel() // channels
        grad_out = x.new_empty((x.shape[0], channels + 1) + x.shape[2:])
        torch.sub(x, mean.view((1, -1) + (1, ) * (x.dim() - 2)),
                  out=grad_out[:, :channels])
        # (1/2 here and 2/m below: the patch mean, exactly)
        grad_out[:, channels].fill_(0.5)
        shape = (channels + 1, ) + tuple(saved.shape[1:])
        grad = _conv_weight_grad(grad_out, inp, shape, self)
        grad = grad.reshape(channels + 1, -1).mul_(2.0 / max(m, 1))
        return grad[channels:], grad[:channels]

    def moment_weight_grad(self, x: Tensor, stride: int = 1,
                           phase: Tuple[int, ...] = (),
                           inp: Optional[Tensor] = None) -> Tensor:
        """``d nu / d W``: shape (C_out, L), ``L`` as in :meth:`patch_mean`.

        This product is CBN's main cost that BatchNorm does not have.

        Args:
            x (Tensor): The producer's output (the CBN input).
            stride (int): Estimate it from every ``stride``-th output
                position along each spatial dimension of a convolution
                (the same weight-gradient call with ``stride`` times the
                conv's stride: about ``stride ** dims`` times cheaper).
                1 is exact.
            phase (tuple[int]): The first position used along each spatial
                dimension (``0 <= phase < stride``).
        """
        dtype = x.dtype
        if inp is None:
            inp = self._input(dtype)
        if self.kind == 'linear':
            m = x.numel() // x.shape[1]
            return torch.mm(x.t(), inp).mul_(2.0 / m)
        if stride > 1:
            x, inp, conv = self._subsampled(x, inp, stride, phase)
        else:
            conv = self
        m = x.numel() // x.shape[1]
        shape = self.node._saved_weight.shape
        shape = (shape[0], inp.shape[1] // self.groups) + tuple(shape[2:])
        grad = _conv_weight_grad(x, inp, shape, conv)
        return grad.reshape(grad.shape[0], -1).mul_(2.0 / max(m, 1))

    def upstream_grads(self, u: Tensor, x: Tensor, centered: Tensor,
                       stride: int = 1, phase: Tuple[int, ...] = (),
                       affine: Optional[Tuple[Tensor, Tensor]] = None
                       ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """The derivatives of the output's per-channel mean and centered
        second moment in the ``R`` channel blocks of ``u`` (an input of
        the producer's input shape times ``R`` channels, each block a
        direction of the producer input): ``(Hm, Hc)``, both (C_out, R,
        C_in), contracted with the weight the producer used.

        Args:
            u (Tensor): (N, R * C_in, ...) the directions.
            x (Tensor): The producer's output (the CBN input).
            centered (Tensor): ``x`` minus its per-channel mean.
            stride (int): As :meth:`moment_weight_grad`.
            phase (tuple[int]): As :meth:`moment_weight_grad`.
            affine (tuple[Tensor], optional): ``(gamma, beta)``, (P,
                C_in) each, when the producer's input is exactly
                ``sum_p gamma_p u_p + beta_p u_{P+p}``: then its own
                :meth:`moment_weight_grad` is the same combination of the
                directions' (returned third, no extra product).
        """
        weight = self.weight_value(x.dtype)
        c_out, c_in = weight.shape[:2]
        blocks = u.shape[1] // c_in
        w = weight.reshape(c_out, 1, c_in, -1)
        pbar = self.patch_mean(x, u).reshape(1, blocks, c_in, -1)
        grad = self.moment_weight_grad(centered, stride, phase, u)
        grad = grad.reshape(c_out, blocks, c_in, -1)
        own = None
        if affine is not None:
            gamma, beta = affine
            coef = torch.cat([gamma, beta]).to(grad.dtype)  # (2P, C_in)
            own = (grad * coef.unsqueeze(-1)).sum(1).reshape(c_out, -1)
        return (w * pbar).sum(-1), (w * grad).sum(-1), own

    def _subsampled(self, x: Tensor, inp: Tensor, stride: int,
                    phase: Tuple[int, ...]):
        """Output positions ``phase + stride * k`` and the input they read:
        a convolution with ``stride`` times the stride, no padding, over the
        padded input shifted by ``phase * conv stride``."""
        dims = x.dim() - 2
        phase = tuple(min(p, n - 1) for p, n in zip(phase, x.shape[2:]))
        x = x[(slice(None), slice(None)) +
              tuple(slice(p, None, stride) for p in phase)]
        if any(self.padding):
            pad = []
            for p in reversed(self.padding):
                pad += [p, p]
            inp = F.pad(inp, pad)
        inp = inp[(slice(None), slice(None)) + tuple(
            slice(p * s, None) for p, s in zip(phase, self.stride))]
        conv = _ConvArgs(
            groups=self.groups,
            stride=tuple(s * stride for s in self.stride),
            padding=(0, ) * dims,
            dilation=self.dilation)
        return x, inp, conv


@dataclass
class _ConvArgs:
    groups: int
    stride: Tuple[int, ...]
    padding: Tuple[int, ...]
    dilation: Tuple[int, ...]


#: One-element tensors expanded to a weight's shape, by (shape, dtype,
#: device): the weight argument of a weight-gradient call is read for its
#: shape only. Real tensors only: a fake one (``FakeTensorMode``, as
#: meta-init and export tools trace) belongs to its mode and would break a
#: later real call or another mode's trace, so fakes get a fresh stand-in.
_STAND_INS: Dict[tuple, Tensor] = {}


def _stand_in(shape: Tuple[int, ...], like: Tensor) -> Tensor:
    if type(like) is not Tensor and is_fake(like):
        return like.new_zeros(1).expand(shape)
    key = (shape, like.dtype, like.device)
    dummy = _STAND_INS.get(key)
    if dummy is None:
        if len(_STAND_INS) >= 256:
            _STAND_INS.clear()
        dummy = _STAND_INS[key] = like.new_zeros(1).expand(shape)
    return dummy


def _conv_weight_grad(grad_out: Tensor, inp: Tensor, weight_shape,
                      prod: Producer) -> Tensor:
    """The weight gradient of a convolution (its weight argument is a
    cached stand-in: only its shape is read)."""
    dummy = _stand_in(tuple(weight_shape), grad_out)
    nd = inp.dim() - 2
    return torch.ops.aten.convolution_backward(
        grad_out, inp, dummy, None, list(prod.stride), list(prod.padding),
        list(prod.dilation), False, [0] * nd, prod.groups,
        [False, True, False])[1]


@dataclass(frozen=True)
class BindingInfo:
    """What a CBN call was bound to, without tensors or autograd nodes
    (kept by the layer after the call; safe to deep-copy and pickle).

    ``weight_id`` is the ``id`` of the producer's weight parameter (None for
    a computed weight or no producer), to name it in reports.
    """

    status: str
    description: str
    key: tuple
    reason: str = ''
    weight_id: Optional[int] = None
    #: The feeding norms followed (``compensate='upstream'``) and the
    #: paths that fell back, in words; '' when not asked for.
    upstream: str = ''
    #: How many feeding norms were followed, and how many paths fell back.
    upstream_followed: int = 0
    upstream_fallbacks: int = 0
    #: The paths not followed, one entry each (see :attr:`upstream`).
    upstream_not_followed: Tuple[str, ...] = ()


@dataclass
class Binding:
    """What a CBN call found behind its input.

    ``status`` is ``'bound'`` (a trainable producer: compensate),
    ``'frozen'`` (a producer with no trainable parameter: the window is exact
    without compensation) or ``'unbound'`` (no usable producer: fall back to
    a window of 1, that is BatchNorm).
    """

    status: str
    producer: Optional[Producer] = None
    reason: str = ''
    #: The norms feeding the producer (``compensate='upstream'``).
    feeding: Optional[object] = None
    #: The feeding norms' state at this call (an
    #: :class:`mmcbn.upstream.Upstream`, set where the history is
    #: compensated; the record and the window gradient reuse it).
    upstream_now: Optional[object] = None

    @property
    def feed_token(self) -> Optional[tuple]:
        """Identity of the feeding norms followed (None: none)."""
        return None if self.feeding is None else self.feeding.token

    @property
    def description(self) -> str:
        if self.producer is not None:
            return self.producer.description
        return self.reason

    @property
    def key(self) -> tuple:
        """Identity of the producer, to tell whether history applies."""
        return self.producer.key if self.producer is not None else (
            'constant', )

    def info(self) -> BindingInfo:
        """This binding without its tensors and autograd node."""
        prod = self.producer
        return BindingInfo(
            status=self.status,
            description=self.description,
            key=self.key,
            reason=self.reason,
            weight_id=None if prod is None else prod.key[1],
            upstream='' if self.feeding is None else
            self.feeding.describe(),
            upstream_followed=0 if self.feeding is None else len(
                self.feeding.paths),
            upstream_fallbacks=0 if self.feeding is None else len(
                self.feeding.fallbacks),
            upstream_not_followed=() if self.feeding is None else tuple(
                self.feeding.fallbacks))


def _resolve_leaf(node):
    """The parameter behind ``node``; None if no gradient flows (frozen)."""
    while node is not None:
        name = type(node).__name__
        if name == 'AccumulateGrad':
            return node.variable
        if name in _PASS_THROUGH and len(node.next_functions) == 1:
            node = node.next_functions[0][0]
            continue
        return _NOT_A_LEAF
    return None


def _conv_binding(node) -> Binding:
    if node._saved_transposed:
        return Binding('unbound', reason='a transposed convolution')
    weight = _resolve_leaf(node.next_functions[1][0])
    bias_sizes = node._saved_bias_sym_sizes_opt
    has_bias = bias_sizes is not None
    bias = _resolve_leaf(node.next_functions[2][0]) if has_bias else None
    if bias is _NOT_A_LEAF:
        return Binding(
            'unbound', reason='a convolution whose bias is computed, not a '
            'parameter')
    weight_id = _param_id(weight)
    live_weight = weight
    if weight is _NOT_A_LEAF:
        # An effective weight (e.g. weight standardization): the output is
        # still linear in it, so compensate with respect to its value.
        live_weight = node._saved_weight
        weight = live_weight.detach()
        weight_id = None
    saved_w = node._saved_weight
    shape = tuple(saved_w.shape)
    # (each _saved_* read builds a new Python object: read them once)
    stride, padding, dilation = tuple(node._saved_stride), tuple(
        node._saved_padding), tuple(node._saved_dilation)
    groups = node._saved_groups
    key = ('conv', weight_id, shape, _param_id(bias), has_bias, stride,
           padding, dilation, groups, weight is not None, bias is not None)
    producer = Producer(
        kind='conv',
        # (a bias-free 3d convolution on the CPU saves an empty bias: it
        # has none; the key keeps what torch says, as saved windows do)
        description=_conv_description(shape, stride, dilation, groups,
                                      has_bias and bias_sizes[0] > 0),
        key=key,
        weight=None if weight is None else weight.detach(),
        bias=None if bias is None else bias.detach(),
        node=node,
        weight_param=None if weight_id is None else weight,
        live_weight=live_weight,
        live_bias=bias,
        groups=groups,
        stride=stride,
        padding=padding,
        dilation=dilation)
    return Binding('bound' if producer.trainable else 'frozen', producer)


@functools.lru_cache(maxsize=1024)
def _conv_description(shape: tuple, stride: tuple, dilation: tuple,
                      groups: int, has_bias: bool) -> str:
    """How reports name a convolution (formatted once per layout)."""
    c_out, c_in_g = shape[:2]
    kernel = 'x'.join(str(s) for s in shape[2:])
    return (f'Conv{len(shape) - 2}d({c_in_g * groups}->{c_out}, k={kernel}, '
            f's={stride}, d={dilation}, g={groups}, bias={has_bias})')


def _linear_binding(node) -> Binding:
    name = type(node).__name__
    if name == 'AddmmBackward0':
        if node._saved_alpha != 1 or node._saved_beta != 1:
            return Binding('unbound', reason='an addmm with alpha/beta != 1')
        bias_node, weight_node = node.next_functions[0][0], \
            node.next_functions[2][0]
        has_bias = True
        c_out = node._saved_mat2_sym_sizes[1]
        c_in = node._saved_mat2_sym_sizes[0]
    else:
        bias_node, weight_node = None, node.next_functions[1][0]
        has_bias = False
        c_in, c_out = node._saved_mat2_sym_sizes
    # F.linear multiplies by W.t(): the weight sits behind a transpose.
    through_t = weight_node is None or any(
        type(n).__name__ == 'TBackward0' for n in _chain(weight_node))
    weight = _resolve_leaf(weight_node)
    bias = _resolve_leaf(bias_node) if has_bias else None
    if weight is _NOT_A_LEAF or bias is _NOT_A_LEAF or not through_t:
        return Binding(
            'unbound', reason='a matrix product that is not nn.Linear')
    desc = f'Linear({c_in}->{c_out}, bias={has_bias})'
    key = ('linear', _param_id(weight), (c_out, c_in), _param_id(bias),
           has_bias, weight is not None, bias is not None)
    producer = Producer(
        kind='linear',
        description=desc,
        key=key,
        weight=None if weight is None else weight.detach(),
        bias=None if bias is None else bias.detach(),
        node=node,
        weight_param=weight,
        live_weight=weight,
        live_bias=bias)
    return Binding('bound' if producer.trainable else 'frozen', producer)


def _param_id(param) -> Optional[int]:
    """``id`` of a parameter, None when there is none."""
    return None if param is None else id(param)


def _chain(node):
    while node is not None:
        yield node
        nxt = node.next_functions
        node = nxt[0][0] if len(nxt) == 1 else None


def saved_tensors_hooked() -> bool:
    """Whether default saved-tensor hooks are active (e.g. inside a
    non-reentrant activation checkpoint)."""
    return torch._C._autograd._top_saved_tensors_default_hooks(
        False) is not None


def in_backward() -> bool:
    """Whether the autograd engine is running (a forward called now is an
    activation-checkpointing recomputation)."""
    return torch._C._current_graph_task_id() != -1


def find_producer(x: Tensor) -> Binding:
    """Inspect the autograd graph of a CBN input for the layer behind it.

    Args:
        x (Tensor): The input of a CBN layer in training mode.

    Returns:
        Binding: The producer and its status, or why none was found.
    """
    if saved_tensors_hooked():
        # Under activation checkpointing (non-reentrant) or offloading the
        # saved tensors are placeholders; reading one would recompute.
        return Binding(
            'unbound',
            reason='saved tensors are hooked (activation checkpointing, '
            'e.g. with_cp=True, or offloading)')
    node = x.grad_fn
    if node is None:
        if torch.is_grad_enabled() and not x.requires_grad:
            # Grad mode is on, yet x needs no grad: x depends on no
            # trainable parameter (raw data, or frozen layers all the way
            # back), so its past statistics are exact as recorded.
            return Binding('frozen', reason='an input that depends on no '
                           'trainable parameter')
        return Binding(
            'unbound',
            reason='its input has no autograd history (grad mode is off, '
            'e.g. torch.no_grad or reentrant activation checkpointing)')
    name = type(node).__name__
    if name == 'ConvolutionBackward0':
        return _conv_binding(node)
    if name in ('AddmmBackward0', 'MmBackward0') and x.dim() == 2:
        return _linear_binding(node)
    return Binding(
        'unbound',
        reason=f'its input comes from {name}, not from a convolution or '
        'linear layer')


def check_autograd_introspection() -> None:
    """Verify that this torch exposes what :func:`find_producer` reads.

    Raises:
        RuntimeError: If the autograd graph of a conv or linear layer no
            longer looks the way mmcbn expects (a torch upgrade changed it).
    """
    conv = torch.nn.Conv2d(2, 3, 3, stride=2, padding=1, bias=True)
    lin = torch.nn.Linear(4, 3)
    checks = (
        (conv(torch.randn(2, 2, 5, 5)), conv, 'conv'),
        (lin(torch.randn(2, 4)), lin, 'linear'),
    )
    for out, module, kind in checks:
        try:
            saved_tensors_hooked(), in_backward()
            binding = find_producer(out)
            ok = (binding.status == 'bound'
                  and binding.producer.kind == kind
                  and binding.producer.weight.data_ptr() ==
                  module.weight.data_ptr()
                  and binding.producer.bias.data_ptr() ==
                  module.bias.data_ptr())
            binding.producer._input(torch.float32)
        except (AttributeError, IndexError, TypeError) as err:
            raise RuntimeError(
                f'mmcbn cannot read the autograd graph of torch '
                f'{torch.__version__}: {err!r}. CBN layers would not find '
                'their producers; please report this torch version.') from err
        if not ok:
            raise RuntimeError(
                f'mmcbn found an unexpected autograd graph for a {kind} layer '
                f'on torch {torch.__version__} ({binding}).')
