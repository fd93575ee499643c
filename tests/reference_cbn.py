# Copyright (c) mmcbn contributors. All rights reserved.
"""A slow, independent CBN written straight from the method note, for tests.

It shares no code with :mod:`mmcbn`: the producer is given explicitly, past
statistics are recomputed from stored producer inputs and parameter
snapshots, the Taylor terms come from ``torch.func.jvp`` (forward-mode
autograd) at the recorded parameters instead of closed forms, and the
normalization is written with plain autograd ops in the ``nu - mu^2`` form of
the method note (``shared/docs/cbn-method.md``).

The rules that decide *which* statistics enter are taken from the note, each
in one small function below, so that tests can pin them with explicit
iteration numbers:

- :func:`window_at` ("Burn-in"): window 1 at iterations ``0 .. burnin - 1``,
  the full window from ``burnin`` on;
- :func:`window_lags` ("Window average and validity"): the window counts the
  current iteration, so ``window=k`` uses the lags ``1 .. k - 1``;
- :func:`pooled_count` ("Running statistics and inference"): running
  statistics follow the current batch by default (BatchNorm's unbiased
  variance over its ``m`` values); with ``running_stats_from='window'``
  they follow the window statistics, whose unbiased variance is over all
  the values pooled in the window (the sum of the entries' counts).

The helpers (:func:`moments`, :func:`compensated_moments`,
:func:`window_average`, :func:`normalize`) are public so that tests can
build the reference statistics of recorded runs (runner tests) with the same
definitions.
"""
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp

#: ``(params, input) -> producer output``.
ApplyFn = Callable[[Dict[str, Tensor], Tensor], Tensor]


# --------------------------------------------------------------- the rules
def window_at(iteration: int, window: int, burnin: int) -> int:
    """Note, "Burn-in": ``k = 1`` for the first ``burnin`` iterations
    (0-based iterations ``0 .. burnin - 1``) and the full window after."""
    return 1 if iteration < burnin else window


def window_lags(k: int) -> range:
    """Note, "Window average and validity": the window ``k`` counts the
    current iteration (``window=8`` uses the current one and the 7 before
    it), so the earlier entries are the lags ``1 .. k - 1``."""
    return range(1, k)


def pooled_count(counts: Sequence[int], running_stats_from: str) -> int:
    """The number of values the unbiased running variance is taken over.

    ``counts`` are the sample counts of the entries that were averaged,
    the current batch first. Note, "Running statistics and inference":
    by default the running statistics are BatchNorm's, from the current
    batch (its ``m`` values); for ``'window'`` they are the window
    statistics, over every value the window pooled.
    """
    if running_stats_from == 'window':
        return int(sum(counts))
    return int(counts[0])


# ------------------------------------------------------------- the algebra
def moments(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-channel mean and second moment ``(mu, nu)`` (channel dim 1)."""
    dims = [d for d in range(x.dim()) if d != 1]
    return x.mean(dims), (x * x).mean(dims)


def count_of(x: Tensor) -> int:
    """Values per channel."""
    return x.numel() // x.shape[1]


def module_apply(module: nn.Module) -> ApplyFn:
    """Run ``module`` with the given parameters (the others as they are)."""
    return lambda params, inp: functional_call(module, params, (inp, ))


def compensated_moments(apply: ApplyFn, inp: Tensor,
                        params_then: Dict[str, Tensor],
                        params_now: Dict[str, Tensor],
                        compensate: bool = True,
                        gradient_only: bool = False
                        ) -> Tuple[Tensor, Tensor]:
    """Note, "Compensation": the first-order estimate of ``(mu, nu)`` of the
    producer output for ``inp`` (recorded under ``params_then``) at
    ``params_now``; the gradients come from forward-mode autograd (jvp).

    The Taylor term is differentiable in ``params_now``: pass the live
    parameters and autograd carries the window rule's gradient through it
    (note, "Gradients"); pass detached ones for the authors' rule.

    With ``compensate=False`` or no trainable parameter (a frozen
    producer) the recorded statistics are returned as they are; with
    ``compensate=False, gradient_only=True`` their values, but with the
    Taylor term's gradient (naive values with the window gradient).
    """

    def stats(params):
        return moments(apply(params, inp))

    if not params_then or not (compensate or gradient_only):
        return stats(params_then)
    delta = {n: params_now[n] - params_then[n] for n in params_then}
    (mu, nu), (dmu, dnu) = jvp(stats, (params_then, ), (delta, ))
    if not compensate:
        return mu + (dmu - dmu.detach()), nu + (dnu - dnu.detach())
    return mu + dmu, nu + dnu


def window_average(mus: Sequence[Tensor],
                   nus: Sequence[Tensor]) -> Tuple[Tensor, Tensor]:
    """Note, "Window average and validity"::

        mu_bar = mean mu,  nu_bar = mean max(nu, mu^2),
        var = max(nu_bar - mu_bar^2, 0)
    """
    mu_bar = torch.stack(list(mus)).mean(0)
    nu_bar = torch.stack([torch.maximum(n, m * m)
                          for m, n in zip(mus, nus)]).mean(0)
    return mu_bar, torch.clamp(nu_bar - mu_bar * mu_bar, min=0)


def normalize(x: Tensor, mean: Tensor, var: Tensor, eps: float,
              weight: Optional[Tensor] = None,
              bias: Optional[Tensor] = None) -> Tensor:
    """``gamma (x - mean) / sqrt(var + eps) + beta`` (biased variance, eps
    inside the square root, as BatchNorm)."""
    shape = (1, -1) + (1, ) * (x.dim() - 2)
    y = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + eps)
    if weight is not None:
        y = y * weight.view(shape)
    if bias is not None:
        y = y + bias.view(shape)
    return y


def normalization_record(x: Tensor, mu_bar: Tensor, var: Tensor, eps: float,
                         mu_t: Tensor, nu_t: Tensor,
                         entries: Dict[int, Tuple[Tensor, Tensor]]) -> dict:
    """What a reference norm layer normalized with in its last training
    call (for the upstream-compensation reference): ``xhat`` (the output
    before the affine), ``mean``/``std`` (``m``, ``sqrt(var + eps)``), the
    current batch's ``(mu, v)`` and its compensated earlier entries
    ``{lag: (mu, nu - mu^2)}`` (before the repair), all detached."""
    shape = (1, -1) + (1, ) * (x.dim() - 2)
    std = torch.sqrt(var.detach() + eps)
    return dict(
        xhat=((x.detach() - mu_bar.detach().view(shape)) / std.view(shape)),
        mean=mu_bar.detach(),
        std=std,
        raw=(mu_t.detach(), (nu_t - mu_t * mu_t).detach()),
        entries=entries)


def _finite(*tensors: Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


class ReferenceCBN(nn.Module):
    """CBN of the method note, bound to ``producer`` explicitly.

    Call as ``ref(producer_input)``: it runs the producer itself, so it can
    record the producer's input and parameters.

    Without :meth:`start_iteration` each training call is one iteration;
    after it, calls until the next :meth:`start_iteration` are the call
    positions of one iteration, each with its own window (note,
    "Iterations").

    Non-finite values (mmcbn's documented conventions, not the paper's): a
    current batch with a non-finite statistic is not recorded and does not
    update the running statistics; an earlier entry whose compensated
    statistics are not finite is left out of the average.

    Args:
        producer (nn.Module): The conv/linear layer before the norm.
        num_features (int): Channels.
        window (int): ``k``.
        burnin (int): Iterations with ``k = 1``.
        eps, momentum, affine, track_running_stats: as ``nn.BatchNorm2d``
            (``momentum=None``: cumulative average).
        compensate (bool): False is naive CBN.
        window_grad (bool, optional): The window rule (gradient through
            the past entries' Taylor terms); False: the authors' rule
            (past entries constant). None follows ``compensate``.
        running_stats_from (str): ``'batch'`` or ``'window'``.
        effective_params (callable, optional): ``producer -> dict`` of the
            tensors the producer's output is linear in (e.g. a computed
            weight), with ``apply``; defaults to its trainable parameters.
        apply (callable, optional): ``(params, input) -> output`` for
            ``effective_params``.
    """

    def __init__(self,
                 producer: nn.Module,
                 num_features: int,
                 window: int,
                 burnin: int = 0,
                 eps: float = 1e-5,
                 momentum: Optional[float] = 0.1,
                 compensate: bool = True,
                 running_stats_from: str = 'batch',
                 affine: bool = True,
                 window_grad: Optional[bool] = None,
                 track_running_stats: bool = True,
                 effective_params: Optional[Callable] = None,
                 apply: Optional[ApplyFn] = None):
        super().__init__()
        self.running_stats_from = running_stats_from
        self.producer = producer
        self.window, self.burnin, self.eps = window, burnin, eps
        self.momentum, self.compensate = momentum, compensate
        self.window_grad = compensate if window_grad is None else window_grad
        self.track_running_stats = track_running_stats
        self._effective = effective_params
        self._apply_fn = apply if apply is not None else module_apply(producer)
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.weight = self.bias = None
        if track_running_stats:
            self.register_buffer('running_mean', torch.zeros(num_features))
            self.register_buffer('running_var', torch.ones(num_features))
            self.register_buffer('num_batches_tracked',
                                 torch.tensor(0, dtype=torch.long))
        else:
            self.running_mean = self.running_var = None
            self.num_batches_tracked = None
        self.iteration = -1
        self._external = False
        self._position = 0
        #: call position -> [(iteration, producer input, params, count)]
        self.history: Dict[int, List[Tuple[int, Tensor, Dict[str, Tensor],
                                           int]]] = {}

    def start_iteration(self, iteration: int) -> None:
        self.iteration = iteration
        self._external = True
        self._position = 0

    def reset(self) -> None:
        """Forget every recorded entry."""
        self.history = {}

    def params_now(self, live: bool = False) -> Dict[str, Tensor]:
        """The producer's current (effective) trainable parameters:
        detached copies, or with ``live`` the tensors themselves (so that
        gradients reach the parameters)."""
        if self._effective is not None:
            params = self._effective(self.producer)
        else:
            params = {
                n: p
                for n, p in self.producer.named_parameters()
                if p.requires_grad
            }
        if live:
            return dict(params)
        return {n: p.detach().clone() for n, p in params.items()}

    def forward(self, inp: Tensor) -> Tensor:
        x = self.producer(inp)
        if not self.training:
            if self.track_running_stats:
                return normalize(x, self.running_mean, self.running_var,
                                 self.eps, self.weight, self.bias)
            mu, nu = moments(x)
            return normalize(x, mu, nu - mu * mu, self.eps, self.weight,
                             self.bias)
        if self._external:
            position = self._position
            self._position += 1
        else:
            self.iteration += 1
            position = 0
        t = self.iteration
        k = window_at(t, self.window, self.burnin)
        lags = set(window_lags(k))
        mu_t, nu_t = moments(x)
        mus, nus, counts = [mu_t], [nu_t], [count_of(x)]
        now = self.params_now()
        # the window rule differentiates the Taylor terms in the live
        # parameters; the authors' rule takes them as constants
        at = self.params_now(live=True) if self.window_grad else now
        history = self.history.setdefault(position, [])
        entries = {}
        with torch.set_grad_enabled(self.window_grad and
                                    torch.is_grad_enabled()):
            for s, old_inp, then, count in history:
                if t - s in lags:
                    mu, nu = compensated_moments(
                        self._apply_fn, old_inp, then, at, self.compensate,
                        gradient_only=self.window_grad)
                    if _finite(mu.detach(), nu.detach()):
                        mus.append(mu)
                        nus.append(nu)
                        counts.append(count)
                        entries[t - s] = (mu.detach(),
                                          (nu - mu * mu).detach())
        mu_bar, var = window_average(mus, nus)
        y = normalize(x, mu_bar, var, self.eps, self.weight, self.bias)
        self.last = normalization_record(x, mu_bar, var, self.eps, mu_t,
                                         nu_t, entries)
        current_ok = _finite(mu_t.detach(), nu_t.detach())
        if self.track_running_stats and current_ok:
            self._update_running(mu_t.detach(), nu_t.detach(),
                                 mu_bar.detach(), var.detach(), counts)
        if current_ok:
            history[:] = [e for e in history if e[0] != t and
                          t - e[0] < self.window] + [
                              (t, inp.detach().clone(), now, count_of(x))]
        return y

    @torch.no_grad()
    def _update_running(self, mu_t, nu_t, mu_bar, var_bar, counts):
        n = pooled_count(counts, self.running_stats_from)
        if self.running_stats_from == 'window':
            new_mean, new_var = mu_bar, var_bar
        else:
            new_mean, new_var = mu_t, nu_t - mu_t * mu_t
        new_var = new_var * n / (n - 1) if n > 1 else new_var
        self.num_batches_tracked += 1
        factor = 1.0 / float(self.num_batches_tracked) \
            if self.momentum is None else self.momentum
        self.running_mean.mul_(1 - factor).add_(factor * new_mean)
        self.running_var.mul_(1 - factor).add_(factor * new_var)
