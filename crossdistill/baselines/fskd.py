"""FSKD: few-sample knowledge distillation (T. Li, J. Li, Z. Liu, C. Zhang, "Few Sample Knowledge
Distillation for Efficient Network Compression", CVPR 2020; arXiv 1812.01839, 2018), a baseline
of Bai et al. (AAAI 2020).

After a pruned layer of the student a 1x1 conv ``Q`` (C x C, initialised to
the identity) is added; ``Q`` is fitted in closed form (least squares) so
that the student's pre-ReLU output matches the teacher's on the few
samples, then merged into the preceding conv so the final student has no
extra layer.

Choices the paper leaves open, or that this code adapts:

- Start: the L1-norm student (:mod:`crossdistill.baselines.l1`), so the
  architecture equals ``compress``'s.
- Where: after every pruned layer of the plan (the consumer whose input
  channels were removed), on its pre-ReLU output: the output of the BN that
  directly follows it, or the layer's own output when no BN follows. Where
  the layer's own outputs were pruned too (VGG), the target is the teacher's
  output restricted to the kept channels (student channel i = teacher
  channel ``kept[i]``).
- Order: layers are fitted and merged one at a time, first to last, so each
  fit sees the student's inputs after all earlier corrections.
- Fit: ``min_Q ||Q y_S - y_T||^2 + lam ||Q - I||^2`` over every pixel of the
  few images, ``lam = ridge * mean diag(Y_S'Y_S)`` (ridge 1e-3; FSKD's plain
  least squares, pulled to identity where the samples leave Q undetermined);
  float64 normal equations. No bias (FSKD's Q is a plain matrix);
  ``bias=True`` adds one, absorbed into the BN shift.
- BN: features are taken with both networks in eval mode (running
  statistics), the mode in which the merge is exact.
- Merge (exact in eval mode). With ``a = gamma / sqrt(var + eps)`` and conv
  bias ``c`` (0 if none) the pre-ReLU output is ``y = a * (W x + c - mu) +
  beta``. ``Q y + q`` is again a conv + BN of the same shape with
  ``W' = diag(1/a) Q diag(a) W`` and ``beta' = Q(beta + a (c - mu)) + q - a (c
  - mu)``, keeping gamma, the running mean / variance and ``c``, so BN keeps
  its statistics. Where some ``|a|`` is below 1e-8 (dead BN channels) the BN
  is turned into a pure shift instead (mean 0, var 1 - eps, gamma 1) and
  ``W' = Q diag(a) W``. Without BN: ``W' = Q W``, ``c' = Q c + q``.
- Structured pruning only (merging a dense Q would undo unstructured sparsity).
- Report: each layer's record carries the feature MSE before and after its
  fit (``loss_before``, ``loss_after``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..capture import capture_outputs, removing
from ..config import CompressConfig
from ..run import CompressReport
from .common import Needs, Run, feature_rows, finish, mse, resolve_configs, ridge_lstsq, start
from .l1 import prune_l1

__all__ = ["FSKDConfig", "fskd", "following_bn", "fit_pointwise", "merge_pointwise"]

_BN = nn.modules.batchnorm._BatchNorm


@dataclass
class FSKDConfig:
    ridge: float = 1e-3  # pull of Q towards the identity (x mean diag of Y_S'Y_S)
    bias: bool = False  # also fit a bias of the 1x1 conv (absorbed into the BN shift / conv bias)
    batch_size: int = 128  # images per forward while capturing features


def following_bn(model: nn.Module, name: str, example: torch.Tensor) -> str | None:
    """Name of the BatchNorm whose input is exactly the output of layer ``name``, if any."""
    layer = model.get_submodule(name)
    bns = {m: n for n, m in model.named_modules() if isinstance(m, _BN)}
    out: dict[str, torch.Tensor] = {}
    found: list[str] = []

    def layer_hook(_m, _inp, o):
        out["y"] = o

    def bn_hook(m, inp):
        if "y" in out and inp[0] is out["y"]:
            found.append(bns[m])

    handles = [layer.register_forward_hook(layer_hook)] + [m.register_forward_pre_hook(bn_hook) for m in bns]
    with removing(handles), torch.no_grad():
        model(example)
    return found[0] if found else None


def fit_pointwise(ys: torch.Tensor, yt: torch.Tensor, ridge: float, bias: bool = False):
    """Q (C, C) and q (C,) minimising ||Q ys + q - yt||^2 + lam ||Q - I||^2 over all pixels."""
    X, Y = feature_rows(ys), feature_rows(yt)  # (M, C)
    c = X.shape[1]
    prior = torch.eye(c, dtype=torch.float64, device=X.device)
    if bias:
        X = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype, device=X.device)], 1)
        prior = torch.cat([prior, torch.zeros(1, c, dtype=prior.dtype, device=prior.device)])
    B = ridge_lstsq(X, Y, ridge, prior)  # (C [+1], C): Y ~ X B
    Q = B[:c].T.contiguous()
    q = B[c] if bias else torch.zeros(c, dtype=B.dtype, device=B.device)
    return Q, q


@torch.no_grad()
def merge_pointwise(layer: nn.Module, bn: nn.Module | None, Q: torch.Tensor, q: torch.Tensor | None = None) -> None:
    """Fold ``y -> Q y + q`` (acting on the pre-ReLU output ``bn(layer(x))``) into ``layer`` and ``bn``."""
    W = layer.weight.double().flatten(1)  # (C, d)
    Q = Q.double().to(W.device)
    C = W.shape[0]
    q = torch.zeros(C, dtype=W.dtype, device=W.device) if q is None else q.double().to(W.device)
    c = layer.bias.double() if layer.bias is not None else torch.zeros(C, dtype=W.dtype, device=W.device)
    if bn is None:
        layer.weight.copy_((Q @ W).view_as(layer.weight))
        new_c = Q @ c + q
        if layer.bias is not None:
            layer.bias.copy_(new_c)
        elif new_c.abs().max() > 0:
            layer.bias = nn.Parameter(new_c.to(layer.weight.dtype))
        return
    if not bn.affine or not bn.track_running_stats:
        raise ValueError("FSKD merges into BatchNorm layers with affine parameters and running statistics only")
    a = bn.weight.double() / (bn.running_var.double() + bn.eps).sqrt()  # (C,)
    shift = a * (c - bn.running_mean.double())  # a (c - mu)
    d = bn.bias.double() + shift  # y = a W x + d
    if a.abs().min() > 1e-8:
        layer.weight.copy_(((Q * a[None, :]) @ W / a[:, None]).view_as(layer.weight))
        bn.bias.copy_(Q @ d + q - shift)
    else:  # dead BN channel: make the BN a pure shift, move the scale into the conv
        layer.weight.copy_(((Q * a[None, :]) @ W).view_as(layer.weight))
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0 - bn.eps)
        bn.weight.fill_(1.0)
        bn.bias.copy_(Q @ d + q - c)


def fskd(
    teacher: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor | None = None,
    config: CompressConfig | None = None,
    params: FSKDConfig | None = None,
    **overrides: Any,
) -> tuple[nn.Module, CompressReport]:
    """L1-norm pruning, then a least-squares 1x1 correction after each pruned layer, merged away."""
    cfg, hp = resolve_configs(config, params, FSKDConfig, overrides)
    run: Run = start("fskd", teacher, images, labels, cfg, Needs(structured=True))
    kept_out = prune_l1(run)
    student, teacher = run.student, run.teacher

    # pre-ReLU output module of each pruned layer; teacher targets in one pass
    points = {p.name: following_bn(student, p.name, run.example) or p.name for p in run.plan}
    targets = capture_outputs(teacher, list(points.values()), run.images, hp.batch_size)
    for rec, p in zip(run.records, run.plan, strict=True):
        t0 = time.perf_counter()
        point = points[p.name]
        yt = targets.pop(point)
        if p.name in kept_out:  # this layer's own outputs were pruned: compare the kept channels
            yt = yt[:, kept_out[p.name].to(yt.device)]
        ys = capture_outputs(student, [point], run.images, hp.batch_size)[point]
        Q, q = fit_pointwise(ys, yt, hp.ridge, hp.bias)
        rec.loss_before = mse(ys, yt)
        rec.loss_after = mse((feature_rows(ys).double() @ Q.T + q), feature_rows(yt))
        bn = student.get_submodule(point) if point != p.name else None
        merge_pointwise(student.get_submodule(p.name), bn, Q, q if hp.bias else None)
        rec.seconds += time.perf_counter() - t0
    return finish(run, hp)
