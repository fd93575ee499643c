# Copyright (c) mmcbn contributors. All rights reserved.
"""The paths from the norm layers feeding a producer to its input
(``compensate='upstream'``, :mod:`mmcbn.upstream`).

A CBN call marks its output's autograd node with what it normalized with
(:class:`mmcbn.upstream.NormOutput`). From a producer's input node,
:func:`find_feeding` walks the autograd graph back through the steps that
are linear once frozen as they ran in the forward pass (ReLU gates,
pooling, upsampling, residual additions, concatenations, RoIAlign and the
row assignments of an RoI extractor) to those marks: each feeding norm
``p`` with the linear map ``L_p`` (a :class:`PathOp` sequence) that
carries its output to the producer's input, so that the producer reads
``sum_p L_p(gamma_p xhat_p + beta_p)`` where every branch is followed.
Everything here is host bookkeeping over autograd nodes, and the
directions ``L_p(xhat_p)``, ``L_p(1)`` built from them (no grad).
"""
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

#: Key of a CBN output's record in its autograd node's ``metadata``.
_KEY = 'mmcbn.norm_output'
#: At most this many feeding norms per producer input (nearest first);
#: the others fall back (the residual chain of a deep stage reaches many
#: norms through identity paths).
MAX_FEEDING = 4


class PathOp:
    """One linear step between a feeding norm's output and the producer's
    input, frozen as it was in the forward pass (no grad): applied to a
    direction of the step's input shape, it gives one of its output shape.

    ``kind`` is ``'gate'`` (a ReLU's mask), ``'maxpool'`` (the selected
    positions), ``'avgpool'`` / ``'adaptive'`` / ``'mean'`` (an average
    pooling),
    ``'nearest'`` / ``'bilinear'`` (an upsampling), ``'roi_align'``
    (mmcv's RoIAlign, average mode, at the RoIs of the forward pass),
    ``'scatter_rows'`` / ``'zero_rows'`` (an indexed assignment of rows,
    what RoI extractors do per pyramid level), ``'scale'`` (a product with
    a constant).
    """

    def __init__(self, kind: str, value=None, args: tuple = ()) -> None:
        self.kind = kind
        self.value = value
        self.args = args

    def __call__(self, t: Tensor) -> Tensor:
        if self.kind == 'gate':
            return t * self.value.to(t.dtype)
        if self.kind == 'maxpool':
            index = self.value
            return t.flatten(2).gather(2, index.flatten(2)).view(index.shape)
        if self.kind == 'avgpool':
            return F.avg_pool2d(t, *self.args)
        if self.kind == 'adaptive':
            return F.adaptive_avg_pool2d(t, self.args)
        if self.kind == 'mean':
            return t.mean(self.args, keepdim=True)
        if self.kind == 'scatter_rows':
            shape, accumulate = self.args
            return t.new_zeros(shape).index_put((self.value, ), t,
                                                accumulate)
        if self.kind == 'zero_rows':
            return t.index_fill(0, self.value, 0)
        if self.kind == 'scale':
            return t * self.value.to(t.dtype)
        if self.kind == 'roi_align':
            from mmcv.ops import roi_align
            return roi_align(t, self.value.to(t.dtype), *self.args)
        if self.kind == 'nearest':
            size, scales = self.args
            return torch.ops.aten.upsample_nearest2d(t, size, *scales)
        size, align, scales = self.args  # bilinear
        return torch.ops.aten.upsample_bilinear2d(t, size, align, *scales)

    def narrow(self, start: int, length: int) -> 'PathOp':
        """The step on channels ``start .. start + length`` only (a
        branch of a concatenation)."""
        if self.kind not in ('gate', 'maxpool'):  # (not per channel)
            return self
        return PathOp(self.kind, self.value[:, start:start + length],
                      self.args)


@dataclass
class FeedPath:
    """One feeding norm, the linear steps from its output to the
    producer's input (``ops``, in forward order) and the first producer
    input channel its channels land on (``start``: a concatenation)."""

    source: object  # (an mmcbn.upstream.NormOutput)
    ops: Tuple[PathOp, ...] = ()
    start: int = 0

    @property
    def channels(self) -> int:
        return int(self.source.x.shape[1])

    def apply(self, t: Tensor) -> Tensor:
        for op in self.ops:
            t = op(t)
        return t

    @property
    def gated(self) -> bool:
        return any(op.kind == 'gate' for op in self.ops)


@dataclass
class Feeding:
    """The norms feeding a producer's input, and the paths not followed."""

    paths: List[FeedPath]
    fallbacks: List[str]
    #: Every branch ended at a followed norm: the producer's input is
    #: exactly ``sum_p L_p(gamma_p xhat_p + beta_p)``.
    complete: bool = False

    @property
    def token(self) -> Optional[tuple]:
        """The identity of the feeding set (None if empty): a window
        recorded under another set does not apply."""
        if not self.paths:
            return None
        return tuple(('cbn', id(p.source.layer), p.source.position,
                      p.channels, p.gated) + ((
                          p.start, tuple(op.kind for op in p.ops)) if
                          p.start or any(op.kind != 'gate' for op in p.ops)
                          else ()) for p in self.paths)

    @property
    def slices(self) -> Tuple[Tuple[int, int, int], ...]:
        """Per path ``(first feeding channel, first producer channel,
        channels)``: where each norm's channels sit in ``C_f`` and in the
        producer's input."""
        out, first = [], 0
        for p in self.paths:
            out.append((first, p.start, p.channels))
            first += p.channels
        return tuple(out)

    def describe(self) -> str:
        names = [_layer_name(p.source.layer) for p in self.paths]
        text = ', '.join(names) if names else 'no feeding CBN'
        if self.fallbacks:
            text += ' | not followed: ' + ', '.join(self.fallbacks)
        return text


def _layer_name(layer) -> str:
    return getattr(layer, 'cbn_name', None) or (
        f'{type(layer).__name__}({layer.num_features})')


def _out_channels(node) -> Optional[int]:
    """The channels of ``node``'s output, where the node tells them."""
    output = node.metadata.get(_KEY)
    if output is not None:
        return int(output.x.shape[1])
    name = type(node).__name__
    try:
        if name == 'ReluBackward0':
            return int(node._saved_result.shape[1])
        if name in ('MaxPool2DWithIndicesBackward0', 'AvgPool2DBackward0',
                    'AdaptiveAvgPool2DBackward0'):
            return int(node._saved_self.shape[1])
        if name in ('UpsampleNearest2DBackward0',
                    'UpsampleBilinear2DBackward0'):
            return int(node._saved_self_sym_sizes[1])
        if name == 'ConvolutionBackward0':
            return int(node._saved_weight.shape[0])
    except RuntimeError:  # freed or modified in place
        return None
    if name == 'AddBackward0' and node.next_functions[0][0] is not None:
        return _out_channels(node.next_functions[0][0])
    return None


def _step_back(node, name: str, shape: tuple):
    """The step behind ``node`` as a :class:`PathOp` and its input's shape
    (None where not linear or unknown)."""
    if name == 'ReluBackward0':
        mask = node._saved_result > 0
        return (PathOp('gate', mask), shape) if \
            tuple(mask.shape) == shape else None
    if name == 'MaxPool2DWithIndicesBackward0':
        index = node._saved_result1
        return (PathOp('maxpool', index), tuple(node._saved_self.shape)) if \
            tuple(index.shape) == shape else None
    if name == 'AvgPool2DBackward0':
        before = tuple(node._saved_self.shape)
        args = (node._saved_kernel_size, node._saved_stride,
                node._saved_padding, node._saved_ceil_mode,
                node._saved_count_include_pad, node._saved_divisor_override)
        return (PathOp('avgpool', args=args), before) if \
            before[:2] == shape[:2] else None
    if name == 'AdaptiveAvgPool2DBackward0':
        before = tuple(node._saved_self.shape)
        return (PathOp('adaptive', args=tuple(shape[2:])), before) if \
            before[:2] == shape[:2] else None
    sizes = tuple(node._saved_self_sym_sizes)
    scales = (node._saved_scales_h, node._saved_scales_w)
    size = list(node._saved_output_size)
    if tuple(shape[2:]) != tuple(size) or sizes[:2] != shape[:2]:
        return None
    if name == 'UpsampleNearest2DBackward0':
        return PathOp('nearest', args=(size, scales)), sizes
    return PathOp('bilinear', args=(size, node._saved_align_corners,
                                    scales)), sizes


#: Linear steps followed (besides additions and concatenations).
_STEPS = ('ReluBackward0', 'MaxPool2DWithIndicesBackward0',
          'AvgPool2DBackward0', 'AdaptiveAvgPool2DBackward0',
          'UpsampleNearest2DBackward0', 'UpsampleBilinear2DBackward0')


def _index_put(node, shape: tuple):
    """``out[idx] = values`` (one 1-D index on the rows): the rows come
    from ``values``, the others from ``self``."""
    indices = node._saved_indices
    if len(indices) != 1 or indices[0] is None or \
            indices[0].dtype != torch.int64 or indices[0].dim() != 1 or \
            len(node.next_functions) != 2:
        return None
    index, accumulate = indices[0], bool(node._saved_accumulate)
    (self_node, _), (values_node, _) = node.next_functions
    rows = (int(index.shape[0]), ) + tuple(shape[1:])
    keep = None if accumulate else PathOp('zero_rows', index)
    return [(self_node, keep, shape),
            (values_node, PathOp('scatter_rows', index,
                                 (shape, accumulate)), rows)]


def _roi_align(node, shape: tuple):
    """mmcv's RoIAlign in average mode: linear in its feature map."""
    if node.pool_mode != 1 or tuple(node.output_size) != tuple(shape[2:]):
        return None  # (max mode is not linear)
    rois = node.saved_tensors[0]
    if rois.shape[0] != shape[0]:
        return None
    args = (tuple(node.output_size), float(node.spatial_scale),
            int(node.sampling_ratio), 'avg', bool(node.aligned))
    return [(node.next_functions[0][0], PathOp('roi_align', rois, args),
             tuple(node.input_shape))]


def _scaled(node, shape: tuple):
    """A product with a constant: a zero Python number (what RoI
    extractors add for an empty pyramid level, to keep its graph) is
    nothing to follow; another 0-dim constant scales the branch."""
    other = node._saved_other
    if other is None or other.requires_grad or other.dim() != 0 or \
            node.next_functions[1][0] is not None:
        return None
    if other.device.type == 'cpu' and float(other) == 0:
        return []  # (a host number: reading it does not synchronize)
    if node._saved_self is not None and \
            tuple(node._saved_self.shape) != shape:
        return None
    return [(node.next_functions[0][0], PathOp('scale', other), shape)]


def _spatial_mean(node, shape: tuple):
    """A mean over the spatial dimensions, kept (a global pooling)."""
    dims = tuple(d % len(shape) for d in node._saved_dim)
    sizes = tuple(node._saved_self_sym_sizes)
    if not node._saved_keepdim or 0 in dims or 1 in dims or \
            len(sizes) != len(shape) or sizes[:2] != shape[:2]:
        return None
    return [(node.next_functions[0][0], PathOp('mean', args=dims), sizes)]


def _same_view(node, shape: tuple):
    """A view that keeps the shape (what an indexed assignment of one row
    inserts)."""
    if tuple(node._saved_self_sym_sizes) != shape:
        return None
    return [(node.next_functions[0][0], None, shape)]


#: Steps with their own rule: ``(node, shape) -> [(next node, op or None,
#: its output shape)]``, [] for nothing to follow, None for a fall-back.
_MORE_STEPS = {
    'IndexPutBackward0': _index_put,
    'RoIAlignFunctionBackward': _roi_align,
    'MulBackward0': _scaled,
    'ViewBackward0': _same_view,
    'MeanBackward1': _spatial_mean,
}


def find_feeding(node, shape: Tuple[int, ...],
                 limit: int = MAX_FEEDING) -> Feeding:
    """Walk the autograd graph back from a producer's input node.

    Follows the linear steps of a frozen forward pass: ``ReluBackward0``
    (its gate), max-pooling (the positions it selected), average pooling,
    nearest and bilinear upsampling, RoIAlign and the indexed row
    assignments of an RoI extractor, products with constants,
    ``AddBackward0`` with ``alpha == 1`` (both branches) and concatenation
    along channels (each branch lands on its channels), and stops at a CBN
    output (a feeding norm). Anything else, a CBN output of another shape,
    a norm reached twice or more than ``limit`` norms is a fall-back (that
    path keeps the producer-only compensation). A branch that needs no
    gradient is constant (data): nothing to compensate.

    Args:
        node: The ``grad_fn`` of the producer's input (may be None).
        shape (tuple[int]): The producer input's shape.
        limit (int): Feeding norms followed at most.
    """
    paths: List[FeedPath] = []
    fallbacks: List[str] = []
    seen = set()
    # (node, steps from the producer back so far, the node's output
    # shape, its first channel in the producer's input)
    queue = [(node, (), tuple(shape), 0)]
    constant = False
    while queue:
        node, steps, shape, start = queue.pop(0)
        if node is None:
            constant = True
            continue
        output = node.metadata.get(_KEY)
        if output is not None:
            if tuple(output.x.shape) != shape:
                fallbacks.append(f'{_layer_name(output.layer)} (shape)')
            elif id(node) in seen:
                fallbacks.append(f'{_layer_name(output.layer)} (reached '
                                 'twice)')
            elif len(paths) >= limit:
                fallbacks.append(f'{_layer_name(output.layer)} (more than '
                                 f'{limit} feeding norms)')
            else:
                seen.add(id(node))
                paths.append(FeedPath(output, steps[::-1], start))
            continue
        name = type(node).__name__
        if name in _STEPS:
            try:
                step = _step_back(node, name, shape)
            except RuntimeError:  # freed, or modified in place since
                step = None
            if step is None:
                fallbacks.append(f'{name} (shape)')
                continue
            op, before = step
            queue.append((node.next_functions[0][0], steps + (op, ), before,
                          start))
        elif name == 'AddBackward0' and node._saved_alpha == 1:
            queue.extend((nxt, steps, shape, start)
                         for nxt, _ in node.next_functions)
        elif name in _MORE_STEPS:
            try:
                more = _MORE_STEPS[name](node, shape)
            except (RuntimeError, AttributeError, TypeError):
                more = None
            if more is None:
                fallbacks.append(name)
                continue
            for nxt, op, before in more:
                queue.append((nxt, steps if op is None else steps + (op, ),
                              before, start))
        elif name == 'CatBackward0' and node._saved_dim in (1, 1 - len(
                shape)):
            branches = [nxt for nxt, _ in node.next_functions]
            widths = [None if b is None else _out_channels(b)
                      for b in branches]
            # (one branch may not tell its width: the rest of the total)
            unknown = [i for i, w in enumerate(widths) if w is None]
            if len(unknown) == 1:
                widths[unknown[0]] = shape[1] - sum(
                    w for w in widths if w is not None)
            if unknown[1:] or sum(widths) != shape[1] or min(widths) <= 0:
                fallbacks.append(f'{name} (channels)')
                continue
            offset = 0
            for branch, width in zip(branches, widths):
                narrowed = tuple(op.narrow(offset, width) for op in steps)
                queue.append((branch, narrowed,
                              (shape[0], width) + tuple(shape[2:]),
                              start + offset))
                offset += width
        elif name in ('ConvolutionBackward0', 'AddmmBackward0',
                      'MmBackward0'):
            # the paper's truncation: a producer fed by another producer
            # with no norm between (its weights' change is not an upstream
            # norm's)
            fallbacks.append(f'{name} (no norm between two producers)')
        else:
            fallbacks.append(name)
    return Feeding(paths, fallbacks,
                   bool(paths) and not fallbacks and not constant)


def directions(path: FeedPath, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """``L(xhat)`` and ``L(1)`` of one feeding norm: its normalized output
    and a constant carried to the producer's input by the path's steps
    (no grad), each (N, C_p, ...) on the producer input's grid."""
    src = path.source
    shape = (1, -1) + (1, ) * (src.x.dim() - 2)
    xhat = (src.x.detach().to(dtype) - src.mean.to(dtype).view(shape)) / \
        src.std.to(dtype).view(shape)
    if not path.ops:
        return xhat, torch.ones_like(xhat)
    return path.apply(xhat), path.apply(torch.ones_like(xhat))


def normalized_inputs(feeding: Feeding, dtype: torch.dtype,
                      channels: Optional[int] = None) -> Tensor:
    """``[L_1 xhat_1, ..., L_P xhat_P, L_1 1, ..., L_P 1]`` along
    channels, each block of the producer's ``channels`` (zeros outside a
    concatenated branch's channels): the input the producer's statistics
    are linear in, per feeding norm's gamma and beta (no grad)."""
    scaled, gates = [], []
    for path in feeding.paths:
        xhat, one = directions(path, dtype)
        width = channels or path.channels
        if width != path.channels:
            pad = (0, 0) * (xhat.dim() - 2) + (
                path.start, width - path.start - path.channels)
            xhat, one = F.pad(xhat, pad), F.pad(one, pad)
        scaled.append(xhat)
        gates.append(one)
    return torch.cat(scaled + gates, 1)
