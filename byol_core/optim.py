"""LARS and plain SGD, with parameter groups built by module type and tensor rank.

LARS (You et al. 2017) as BYOL uses it: "we exclude the biases and batch normalization parameters
from both LARS adaptation and weight decay" (BYOL B.1). Exclusion is decided by what a parameter
is (a norm layer's affine parameter, or any tensor of rank <= 1), never by its name.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.optim import Optimizer

from byol_core.spec import OptimSpec

NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


class LARS(Optimizer):
    """SGD with momentum whose update for each tensor w is scaled by the trust ratio
    ``eta * ||w|| / ||g + wd * w||`` (1 where either norm is 0).

    Param-group options: ``weight_decay``, ``lars`` (adapt this group or not: groups without it
    are plain SGD with momentum), ``lr_mult``. Trust ratios are ``torch._foreach_*`` ops over a
    group's tensors and stay on the device (no host synchronisation; the last ones are kept in
    ``self.trust`` for diagnostics); decay, momentum and update then run as torch's fused SGD
    kernel on CPU and CUDA tensors (``fused=False``: as foreach ops, the path on other devices).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 1e-3,
        lars: bool = True,
        fused: bool = True,
    ) -> None:
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars=lars)
        super().__init__(params, defaults)
        self.fused = fused
        # Last trust ratio per tensor, by group index; kept out of state_dict (a diagnostic).
        self.trust: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            weight_decay = group["weight_decay"]
            if group["lars"]:
                if weight_decay:
                    grads = torch._foreach_add(grads, params, alpha=weight_decay)
                    weight_decay = 0.0  # in the gradients now, before the trust ratio
                w_norm = torch.stack(torch._foreach_norm(params))
                g_norm = torch.stack(torch._foreach_norm(grads))
                trust = torch.where(
                    (w_norm > 0) & (g_norm > 0), group["eta"] * w_norm / g_norm, 1.0
                )
                self.trust[index] = trust
                grads = torch._foreach_mul(grads, list(trust.unbind()))
            bufs = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    # A zero buffer makes the first step v = g, as torch.optim.SGD does.
                    state["momentum_buffer"] = torch.zeros_like(p)
                bufs.append(state["momentum_buffer"])
            if self.fused and _fusable(params):
                # One kernel for decay, momentum and update (torch's fused SGD): a third of the
                # foreach version's time on the CPU (docs/benchmarks.md, optimizer lever).
                momentum = group["momentum"]
                params, grads, bufs = _dense_views(params, grads, bufs)
                torch._fused_sgd_(
                    params, grads, bufs if momentum else [], weight_decay=weight_decay,
                    momentum=momentum, lr=group["lr"], dampening=0.0, nesterov=False,
                    maximize=False,
                    is_first_step=False,  # the zero buffer already makes the first v = g
                )  # fmt: skip
                continue
            if weight_decay:
                grads = torch._foreach_add(grads, params, alpha=weight_decay)
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_add_(bufs, grads)
            torch._foreach_add_(params, bufs, alpha=-group["lr"])
        return loss


def _dense_views(
    params: list[torch.Tensor], grads: list[torch.Tensor], bufs: list[torch.Tensor]
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Each (parameter, gradient, buffer) whose three tensors share one dense but
    non-contiguous layout (a channels_last convolution weight) as contiguous views of the same
    memory, dimensions permuted by stride; other triples as they are.

    The update is elementwise, so permuting all three alike changes nothing, but the fused
    kernel on the CPU makes a contiguous copy of every non-contiguous operand and writes it
    back: 3x the time of the same update on contiguous tensors (12.8 against 4.3 ms for
    ResNet-18's 3x3 weights on the Zen 4 CPU, docs/benchmarks.md).
    """
    out_p, out_g, out_b = [], [], []
    for p, g, b in zip(params, grads, bufs, strict=True):
        if not p.is_contiguous() and g.stride() == p.stride() == b.stride():
            order = sorted(range(p.dim()), key=lambda d: -p.stride(d))
            view = p.permute(order)
            if view.is_contiguous():
                p, g, b = view, g.permute(order), b.permute(order)
        out_p.append(p)
        out_g.append(g)
        out_b.append(b)
    return out_p, out_g, out_b


def _fusable(params: list[torch.Tensor]) -> bool:
    """torch's fused SGD kernel takes floating tensors on one CPU or CUDA device, one dtype."""
    first = params[0]
    return first.device.type in ("cpu", "cuda") and all(
        p.device == first.device and p.dtype == first.dtype and p.is_floating_point()
        for p in params
    )


def _is_excluded(module: nn.Module, param: torch.Tensor) -> bool:
    return isinstance(module, NORM_TYPES) or param.ndim <= 1


def _matches(path: str, prefixes: list[str] | None) -> bool:
    if prefixes is None:
        return True
    return any(path == p or path.startswith(p + ".") for p in prefixes)


def param_groups(online: nn.Module, spec: OptimSpec) -> list[dict]:
    """Groups keyed by (LARS or not, weight decay or not, predictor or not).

    ``lars_modules`` limits LARS to module paths relative to the online network, e.g.
    ``encoder.layer1`` (the study's appendix: layer1 + layer2 only, or ``projector``/``predictor``).
    """
    use_lars = spec.name == "lars"
    groups: dict[tuple[bool, bool, bool], list[torch.Tensor]] = {}
    for path, module in online.named_modules():
        for param in module.parameters(recurse=False):
            if not param.requires_grad:
                continue
            excluded = spec.exclude_bias_and_norm and _is_excluded(module, param)
            lars = use_lars and not excluded and _matches(path, spec.lars_modules)
            predictor = path == "predictor" or path.startswith("predictor.")
            groups.setdefault((lars, excluded, predictor), []).append(param)
    return [
        {
            "params": params,
            "lars": lars,
            "weight_decay": 0.0 if excluded else spec.weight_decay,
            "lr_mult": spec.predictor_lr_mult if predictor else 1.0,
        }
        for (lars, excluded, predictor), params in sorted(groups.items())
    ]


def build_optimizer(online: nn.Module, spec: OptimSpec, lr: float) -> Optimizer:
    """LARS for ``name='lars'``; for ``'sgd'`` the same optimizer with adaptation off everywhere,
    which is exactly torch's SGD with momentum and L2 weight decay (tests check this)."""
    groups = param_groups(online, spec)
    return LARS(groups, lr=lr, momentum=spec.momentum, eta=spec.lars_eta)


def set_lr(optimizer: Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
