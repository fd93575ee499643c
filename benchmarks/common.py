# Copyright (c) mmcbn contributors. All rights reserved.
"""Shared pieces of the CBN benchmarks: data, a small ResNet, norms, I/O.

Dataset: scikit-learn's bundled ``load_digits`` (1797 real 8x8 grey-scale
handwritten digits, UCI optdigits test set, shipped inside the scikit-learn
wheel). It is the only real image data set available on these machines
without a download, and it is small enough to train a ResNet from scratch
on one CPU thread in seconds per epoch. Images are kept at 8x8 or
upsampled (bilinear, e.g. to 16x16 for a 4-stage ResNet), and standardized
with the training split's mean and std. The train/test split is stratified
and fixed by a seed.
"""
import argparse
import datetime
import json
import os
import os.path as osp
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from mmcbn import CBN2d, MABN2d, ConvWC  # noqa: E402

DEFAULT_OUT = osp.join(ROOT, 'benchmarks', 'results')


def dataset_note(size: int) -> str:
    """One line saying which data set is used, and why."""
    scale = ('kept at 8x8' if size == 8 else
             f'upsampled to {size}x{size} (bilinear)')
    return ("scikit-learn load_digits: 1797 real 8x8 grey-scale handwritten "
            "digits bundled in the scikit-learn wheel (no download; the only "
            f"real image data set available offline here), {scale}, "
            "standardized with the training mean/std, stratified 80/20 "
            "train/test split fixed by seed 0")


# ---------------------------------------------------------------- data
def load_digits_split(split_seed: int = 0, size: int = 16,
                      test_fraction: float = 0.2):
    """Return ``(x_train, y_train, x_test, y_test)`` float32/int64 tensors.

    ``x`` has shape (N, 1, size, size).
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as err:  # pragma: no cover
        raise SystemExit(
            'The benchmarks need scikit-learn (for its bundled digits data '
            'set): pip install scikit-learn') from err
    digits = load_digits()
    x = digits.images.astype(np.float32)[:, None]  # (N, 1, 8, 8), 0..16
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, stratify=y, random_state=split_seed)
    x_tr, x_te = torch.from_numpy(x_tr), torch.from_numpy(x_te)
    if size != 8:
        x_tr = F.interpolate(x_tr, size=(size, size), mode='bilinear',
                             align_corners=False)
        x_te = F.interpolate(x_te, size=(size, size), mode='bilinear',
                             align_corners=False)
    mean, std = x_tr.mean(), x_tr.std()
    x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    return (x_tr.contiguous(), torch.from_numpy(y_tr), x_te.contiguous(),
            torch.from_numpy(y_te))


# ---------------------------------------------------------------- norms
def make_norm_factory(kind: str, **kwargs) -> Callable[[int], nn.Module]:
    """``kind``: 'bn', 'gn' (``groups``), 'cbn' (CBN2d kwargs), 'mabn'
    (MABN2d kwargs) or 'sma' (the moving-average probe of ``sma_norm``)."""
    if kind == 'bn':
        return lambda c: nn.BatchNorm2d(c)
    if kind == 'gn':
        groups = kwargs.get('groups', 8)
        return lambda c: nn.GroupNorm(min(groups, c), c)
    if kind == 'cbn':
        return lambda c: CBN2d(c, **kwargs)
    if kind == 'mabn':
        return lambda c: MABN2d(c, **kwargs)
    if kind == 'sma':
        from sma_norm import sma_norm
        return lambda c: sma_norm(c, **kwargs)
    raise ValueError(kind)


def make_conv(kind: Optional[str]) -> Callable[..., nn.Conv2d]:
    """The convolution class: None (``nn.Conv2d``), ``'ws'`` (weight
    standardization, mmcv's ``ConvWS2d``) or ``'wc'`` (weight centring,
    ``mmcbn.ConvWC``)."""
    if kind is None:
        return nn.Conv2d
    if kind == 'ws':
        from mmcv.cnn.bricks.conv_ws import ConvWS2d
        return ConvWS2d
    if kind == 'wc':
        return ConvWC
    raise ValueError(f'unknown conv kind {kind!r}')


# ---------------------------------------------------------------- model
class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convs, no conv bias, as in ResNet-18)."""

    def __init__(self, c_in, c_out, stride, norm, conv=nn.Conv2d):
        super().__init__()
        self.conv1 = conv(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = norm(c_out)
        self.conv2 = conv(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = norm(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                conv(c_in, c_out, 1, stride, bias=False), norm(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class SmallResNet(nn.Module):
    """A CIFAR-style ResNet for small grey images.

    ``widths``/``blocks`` per stage; the first stage has stride 1, the
    others stride 2. ``widths=(w, 2w, 4w, 8w), blocks=(2, 2, 2, 2)`` is
    ResNet-18's layout. ``conv`` is the convolution class (weight
    standardization or centring: :func:`make_conv`).
    """

    def __init__(self, norm: Callable[[int], nn.Module],
                 widths: Sequence[int] = (16, 32, 64),
                 blocks: Sequence[int] = (1, 1, 1), in_channels: int = 1,
                 num_classes: int = 10, conv=nn.Conv2d):
        super().__init__()
        self.conv1 = conv(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = norm(widths[0])
        layers = []
        c_in = widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(BasicBlock(c_in, w, stride, norm, conv))
                c_in = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out',
                                        nonlinearity='relu')

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        return self.fc(x.mean((2, 3)))


def conv_norm_pairs(model: nn.Module) -> List[tuple]:
    """``(conv_name, conv, norm_name, norm)`` in forward order.

    Relies on each norm being registered right after its conv (true for
    :class:`SmallResNet`).
    """
    pairs, last = [], None
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            last = (name, m)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            pairs.append((last[0], last[1], name, m))
            last = None
    return pairs


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             batch: int = 512) -> float:
    """Top-1 accuracy (%) in eval mode (running statistics)."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            correct += (model(x[i:i + batch]).argmax(1) == y[i:i + batch]
                        ).sum().item()
    return 100.0 * correct / len(x)


# ---------------------------------------------------------------- output
def git_state() -> str:
    """``<commit>`` of the checkout, ``+dirty`` if mmcbn/ has edits."""
    import subprocess
    try:
        commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'],
                                cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(['git', 'status', '--porcelain', 'mmcbn'],
                               cwd=ROOT, capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return 'unknown'
    return (commit or 'unknown') + ('+dirty mmcbn/' if dirty else '')


def benchmark_parser(doc: str,
                     quick_help: str = 'tiny smoke run (< 1 min), for tests'
                     ) -> argparse.ArgumentParser:
    """The options every benchmark script has: ``--out`` (where its JSON
    and PNG go) and ``--quick``; ``doc``'s first line is the description."""
    parser = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    parser.add_argument(
        '--out',
        default=DEFAULT_OUT,
        help='folder for the JSON and PNG (default: %(default)s)')
    parser.add_argument('--quick', action='store_true', help=quick_help)
    return parser


def machine_info() -> Dict[str, object]:
    return dict(
        git=git_state(),
        date=datetime.datetime.now().isoformat(timespec='seconds'),
        platform=platform.platform(),
        processor=platform.processor() or platform.machine(),
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        python=platform.python_version(),
        torch=torch.__version__,
        command=' '.join([osp.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
    )


def write_json(path: str, data: dict) -> None:
    os.makedirs(osp.dirname(path) or '.', exist_ok=True)

    def clean(v):
        if isinstance(v, float):
            return round(v, 6)
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    with open(path, 'w') as f:
        json.dump(clean(data), f, indent=1)
        f.write('\n')


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ['| ' + ' | '.join(header) + ' |',
             '|' + '|'.join(' --- ' for _ in header) + '|']
    for r in rows:
        lines.append('| ' + ' | '.join(str(c) for c in r) + ' |')
    return '\n'.join(lines)


def save_png(fig, path: str, dpi: int = 90) -> None:
    """Save a matplotlib figure as a small palette PNG (keeps git small)."""
    import io

    from PIL import Image
    buf = io.BytesIO()
    fig.savefig(buf, format='png', dpi=dpi)
    buf.seek(0)
    img = Image.open(buf).convert('RGB').quantize(colors=128)
    os.makedirs(osp.dirname(path) or '.', exist_ok=True)
    img.save(path, optimize=True)


class DeviceClock:
    """Times work on a device: ``time.perf_counter`` on the CPU, CUDA events
    on a GPU (the device is synchronized only at the timing boundaries,
    never inside the timed work).

    ``clock.time(fn)`` returns the seconds ``fn()`` took. For many short
    intervals inside one piece of work (parts of a training step),
    ``token = clock.start()`` / ``clock.stop(token, name)`` record them
    without synchronizing, and ``clock.totals()`` synchronizes once and
    returns ``{name: (seconds, calls)}``.
    """

    def __init__(self, device='cpu'):
        self.device = torch.device(device)
        self.cuda = self.device.type == 'cuda'
        self._open = []

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def _mark(self):
        if self.cuda:
            # on the chosen device's current stream, not the current
            # device's (they differ when the device is not cuda:0)
            with torch.cuda.device(self.device):
                event = torch.cuda.Event(enable_timing=True)
                event.record(torch.cuda.current_stream(self.device))
            return event
        return time.perf_counter()

    def time(self, fn) -> float:
        self.sync()
        start = self._mark()
        fn()
        end = self._mark()
        if self.cuda:
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        return end - start

    def start(self):
        return self._mark()

    def stop(self, token, name: str) -> None:
        self._open.append((name, token, self._mark()))

    def totals(self) -> Dict[str, tuple]:
        self.sync()
        out: Dict[str, list] = {}
        for name, start, end in self._open:
            seconds = (start.elapsed_time(end) / 1e3 if self.cuda else
                       end - start)
            entry = out.setdefault(name, [0.0, 0])
            entry[0] += seconds
            entry[1] += 1
        self._open = []
        return {k: tuple(v) for k, v in out.items()}


def time_round_robin(clock: DeviceClock, fns: Dict[str, Callable],
                     reps: int, warmup: int = 2) -> Dict[str, float]:
    """Median seconds of each function, timed in turn (one call of each per
    round), so that machine load affects them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: Dict[str, list] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(clock.time(fn))
    return {name: statistics.median(t) for name, t in times.items()}


def load_average() -> List[float]:
    """The 1, 5 and 15 minute load averages (empty where unknown)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return []


def device_name(device) -> str:
    """The CPU model or the GPU name, for the tables."""
    device = torch.device(device)
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:  # pragma: no cover
        pass
    return platform.processor() or platform.machine()


class Timer:

    def __init__(self):
        self.start = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.start
