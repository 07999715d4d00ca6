"""Per-layer solvers: exact least squares on Gram statistics, and the official Adam loop.

With the kept input channels (structured) or weights (unstructured) fixed,
every objective of :mod:`crossdistill.objectives` is linear least squares in
W^S. Writing ``U_T``/``U_S`` for the im2col matrices of h^T/h^S (rows = output
positions, columns = ``C_in*k*k``), a term
``w ||(p U_T + q U_S) W^T' - (r U_T + s U_S) W^S'||^2`` needs only three Gram
matrices, ``G_TT = U_T'U_T``, ``G_SS = U_S'U_S`` and ``G_TS = U_T'U_S``, which
:class:`LayerStats` accumulates batch by batch (SparseGPT-style
``add_batch`` / ``system`` / ``free``), so memory stays bounded for any N.

Ridge: ``ridge * mean(diag(A'A)) * ||W_K - W0_K||^2`` is added, pulling the
solution towards the starting (teacher) weights where the few samples do not
determine it (late layers see few output positions: M can be < C_in*k*k).
Optionally the ridge grows with the unknowns per row (:func:`conditioned_ridge`):
``ridge_conditioned`` multiplies it by ``max(1, d / M)``, ``ridge_per_unknown``
adds ``c * d / M``. A 1x1 conv on 2x2 maps or a wide Linear layer has far fewer
rows than weights and can fit the few images exactly; on random-init networks
fed noise that fit misses any other image by orders of magnitude, but on
trained teachers it generalises (VGG-16 at K=1 loses 28 / 52 points of
validation accuracy with NC / Ours under ``c`` = 1), so both are off by default.

Never worse: every solver compares its solution with the *masked start* (the
starting weights with the same channels / weights removed, i.e. pruning
without re-fit) on the layer's objective and keeps the masked start when the
solve ends higher (``SolveResult.fell_back``), so a re-fit never makes a
layer worse than not re-fitting it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .gram import explicit_padding, gram, output_rows
from .objectives import Term
from .spill import Batches, pairs

__all__ = [
    "LayerProblem",
    "LstsqOptions",
    "AdamOptions",
    "SolveResult",
    "LayerStats",
    "LeastSquares",
    "GramSystem",
    "RowSystem",
    "layer_fn",
    "unfold",
    "ridge_solve",
    "kept_columns",
    "solve_structured",
    "solve_unstructured",
    "solve_grouped",
    "GroupSystems",
    "group_systems",
    "groups_result",
    "adam_solve",
    "weight_mask",
    "weight_product",
    "explicit_padding",
    "conditioned_ridge",
    "effective_ridge",
    "never_worse",
    "group_targets",
    "select_channels",
    "select_units",
]


@dataclass
class LayerProblem:
    """One layer's re-fit: the objective ``terms`` on its inputs, the weights, and how much to keep."""

    terms: list[Term]
    wT: torch.Tensor  # teacher weight (C_out, C_in, kh, kw) or (C_out, C_in)
    w0: torch.Tensor  # starting weight of the student, same shape
    n_keep: int  # kept input channels (structured) or weights (unstructured)
    fixed: torch.Tensor | None = None  # structured: input channels that are always kept (n_keep counts them)
    structured: bool = True
    # structured: group id of each input channel (its producer is a grouped conv); the same share of
    # every group is kept so the producer stays a valid grouped conv (None: no constraint)
    channel_groups: torch.Tensor | None = None
    # structured: unit id of each input channel; channels of one unit share a producer filter and are
    # kept or removed together (GhostNet twins; ChannelRemover.channel_ties). None: every channel alone
    ties: torch.Tensor | None = None


def group_targets(groups: torch.Tensor, n_keep: int) -> dict[int, int]:
    """Kept channels per group for ``n_keep`` of ``len(groups)``: the same share of each, at least one."""
    ratio = n_keep / len(groups)
    ids, sizes = groups.unique(return_counts=True)
    return {int(g): max(1, math.floor(ratio * int(n) + 1e-9)) for g, n in zip(ids, sizes, strict=True)}


def select_channels(
    keep: torch.Tensor,
    scores: torch.Tensor,
    count: int,
    groups: torch.Tensor | None,
    n_keep: int,
    ties: torch.Tensor | None = None,
) -> torch.Tensor:
    """The ``count`` best of ``keep`` (sorted), by ``scores``; with ``groups`` (a group id per input channel)
    each group keeps its share, falling linearly with ``count`` to its :func:`group_targets` value; with
    ``ties`` (a unit id per input channel) whole units, ranked by their channels' summed scores."""
    if ties is not None and groups is None:
        return select_units(keep, scores, count, ties)
    if groups is None:
        return keep[scores.topk(count).indices.sort().values]
    gk = groups.to(keep.device)[keep]
    targets = group_targets(groups, n_keep)
    total = len(groups)
    chosen = []
    for g, target in targets.items():
        idx = (gk == g).nonzero().flatten()
        size = int((groups == g).sum())
        # this group's count at the same point of the schedule as ``count`` for the whole layer
        frac = (total - count) / max(total - n_keep, 1)
        c = max(target, min(len(idx), round(size - (size - target) * frac)))
        chosen.append(idx[scores[idx].topk(c).indices])
    return keep[torch.cat(chosen).sort().values]


def select_units(keep: torch.Tensor, scores: torch.Tensor, count: int, ties: torch.Tensor) -> torch.Tensor:
    """Whole units of ``keep`` (sorted), best summed score first, up to ``count`` channels: a unit that would
    overshoot is passed over for a smaller one, so equal units of size u keep ``count`` rounded down to u."""
    unit = ties.to(keep.device)[keep]
    ids, inv = unit.unique(return_inverse=True)
    total = torch.zeros(len(ids), dtype=torch.float64, device=keep.device).index_add_(0, inv, scores.double())
    sizes = torch.bincount(inv, minlength=len(ids)).tolist()
    chosen = torch.zeros(len(keep), dtype=torch.bool, device=keep.device)
    left = count
    for u in total.argsort(descending=True, stable=True).tolist():
        if 0 < sizes[u] <= left:
            chosen |= inv == u
            left -= sizes[u]
    return keep[chosen.nonzero().flatten()]


@dataclass
class LstsqOptions:
    """Settings of the exact least-squares solvers (CompressConfig fields of the same names)."""

    ridge: float = 1e-3  # relative ridge towards the starting weights (x mean diag of the Gram)
    steps: int = 4  # structured: elimination steps from all channels to n_keep
    channel_criterion: str = "energy"  # structured: energy | norm
    weight_criterion: str = "magnitude"  # unstructured: magnitude | energy
    batch_size: int = 128  # grouped convs: images per batch while accumulating statistics
    ridge_conditioned: bool = True  # scale the ridge by max(1, unknowns / rows) (conditioned_ridge)
    ridge_per_unknown: float = 0.0  # add this x unknowns / rows to the relative ridge (conditioned_ridge)


@dataclass
class AdamOptions:
    """Settings of the official Adam loop (CompressConfig fields of the same names)."""

    iterations: int = 3000  # full-batch iterations per layer
    lr: float = 5e-4
    lr_drop: float = 0.1  # structured: lr factor once the mask is fixed


def layer_fn(layer: nn.Module):
    """``fn(h, W)``: the layer's linear op (no bias), as used by every objective."""
    if isinstance(layer, nn.Conv2d):
        return lambda h, w: F.conv2d(h, w, None, layer.stride, layer.padding, layer.dilation, layer.groups)
    if isinstance(layer, nn.Linear):
        return lambda h, w: F.linear(h, w)
    raise TypeError(f"cannot solve for layer type {type(layer).__name__}")


def unfold(h: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """im2col: (N, C, H, W) -> (N*L, C*kh*kw) in the column order of ``W.flatten(1)``."""
    if isinstance(layer, nn.Linear):
        return h.reshape(-1, h.shape[-1])
    if layer.groups != 1:
        raise TypeError("grouped convolutions are solved group by group (solve_grouped), not by unfold")
    if layer.padding_mode != "zeros":
        raise TypeError("only convolutions with zero padding are supported by the least-squares solver")
    cols = F.unfold(h, layer.kernel_size, layer.dilation, explicit_padding(layer), layer.stride)  # (N, C*kh*kw, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])  # (N*L, C*kh*kw)


def _mix(hT: torch.Tensor, hS: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """``a hT + b hS``, returning the tensor itself for (1, 0) / (0, 1) so equal inputs stay recognisable."""
    if b == 0:
        return hT if a == 1 else a * hT
    if a == 0:
        return hS if b == 1 else b * hS
    return a * hT + b * hS


def _residual_mix(t: Term) -> tuple[float, float]:
    """Coefficients of ``(p - r) h^T + (q - s) h^S``, the input of the residual ``Y - U_x W^T'`` of a term;
    differences within rounding (Ours-S with alpha + beta = 1) count as zero."""
    a, b = t.p - t.r, t.q - t.s
    return (0.0 if abs(a) <= 1e-9 else a), (0.0 if abs(b) <= 1e-9 else b)


def weight_product(layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``U_x' Y`` for the layer's im2col ``U_x`` of input ``x`` and an output-shaped ``y``: the gradient of
    ``<y, layer(x)>`` with respect to the weight, one backward-weight convolution (the cost of one layer
    forward), no im2col. float64 (d, C_out), or (G, d_g, C_out/G) for a conv with G groups."""
    if isinstance(layer, nn.Linear):
        return (x.reshape(-1, x.shape[-1]).T @ y.reshape(-1, y.shape[-1])).double()
    w_shape = (y.shape[1], *layer.weight.shape[1:])
    gw = torch.nn.grad.conv2d_weight(
        x, w_shape, y, layer.stride, explicit_padding(layer), layer.dilation, layer.groups
    ).double()  # (C_out, C_in/G, kh, kw)
    g = layer.groups
    if g == 1:
        return gw.flatten(1).T
    return gw.reshape(g, y.shape[1] // g, -1).transpose(1, 2)


class LayerStats:
    """Streaming statistics of one layer's teacher and student inputs.

    With the objective known up front (``terms`` and ``wT``, as in every
    compression) it keeps exactly what the least-squares system needs: per
    term ``w ||Y_t - U_t W^S'||^2`` with student-side input ``x_t = r h^T + s h^S``
    (im2col ``U_t``) and target ``Y_t = W^T * (p h^T + q h^S)`` (the teacher
    layer's forward), ``G = sum w U_t'U_t`` (symmetric Grams of the student-side
    inputs only; one for NC and Ours-S, two for the mu-mix), ``C = sum w U_t'Y_t``
    as ``G W^T' + C_res``, ``C_res = sum w U_t'R_t`` with ``R_t = Y_t - U_t W^T'`` the
    residual of the teacher's weights (a backward-weight convolution; absent for
    the mu-mix, where ``R_t = 0``; no cross Gram ``U_T'U_S``) and ``const = sum w
    ||Y_t||^2 = tr(W^T G W^T') + 2 tr(W^T C_res) + sum w ||R_t||^2``, all float64:
    the targets themselves are never computed, and a target ``W^T`` reaches is
    solved by ``W^T`` with loss 0 to rounding. Without them it keeps the three
    Grams ``G_TT, G_SS, G_TS`` and builds any objective from them.

    While the total number of rows stays below ``d = C_in*k*k`` it keeps the
    im2col rows themselves instead: late layers see few output positions (M << d
    on a few-shot batch), and solving through the Woodbury identity in the row
    space then costs O(M^2 d) instead of O(d^3).
    """

    def __init__(self, layer: nn.Module, terms: list[Term] | None = None, wT: torch.Tensor | None = None):
        """``terms`` and ``wT``: the ones :meth:`system` will get (then the direct statistics above)."""
        if getattr(layer, "groups", 1) != 1:
            raise TypeError("grouped convolutions are solved group by group (solve_grouped), not by LayerStats")
        self.layer = layer
        self.rows = 0
        self.G_TT = self.G_SS = self.G_TS = None
        self.U_T: list[torch.Tensor] | None = []
        self.U_S: list[torch.Tensor] | None = []
        self.terms, self.wT = terms, wT
        self.direct = terms is not None and wT is not None
        self.G: torch.Tensor | float = 0.0
        self.C_res: torch.Tensor | float = 0.0
        self.const = 0.0

    def add_batch(self, hT: torch.Tensor, hS: torch.Tensor) -> None:
        same = hS is hT
        self.rows += output_rows(self.layer, hT)
        d = self.layer.weight[0].numel()
        if self.U_T is not None and 2 * self.rows < d:  # few rows: keep them (row-space solve)
            UT = unfold(hT, self.layer)  # (M, d)
            self.U_T.append(UT)
            self.U_S.append(UT if same else unfold(hS, self.layer))
            return
        if self.U_T:  # crossed over: fold the rows kept so far into the statistics
            UT, US = torch.cat(self.U_T), torch.cat(self.U_S)
            if self.direct:
                self._add_direct(UT, US, rows=True)
            else:
                self._add_grams(lambda a, b: (a.T @ b).double(), UT, US, UT is US)
        self.U_T = self.U_S = None
        if self.direct:
            self._add_direct(hT, hS, rows=False)
        else:
            self._add_grams(lambda a, b: gram(self.layer, a, b), hT, hS, same)

    def _add_direct(self, hT: torch.Tensor, hS: torch.Tensor, rows: bool) -> None:
        """Add G, C_res and the residuals' energy of the known objective for inputs (or, ``rows``, im2col
        rows) hT and hS."""
        wt = self.wT.to(hT.dtype)
        fn = (lambda h, w: h @ w.flatten(1).T) if rows else layer_fn(self.layer)
        grams: dict[int, torch.Tensor] = {}  # by input tensor: equal student-side inputs share one Gram
        for t in self.terms or []:
            x = _mix(hT, hS, t.r, t.s)
            if id(x) not in grams:
                grams[id(x)] = (x.T @ x).double() if rows else gram(self.layer, x)
            self.G = self.G + t.weight * grams[id(x)]
            a, b = _residual_mix(t)
            if a or b:  # R = Y - U_x W^T': the target's part that W^S = W^T does not reach
                res = fn(_mix(hT, hS, a, b), wt)
                c = (x.T @ res).double() if rows else weight_product(self.layer, x, res)
                self.C_res = self.C_res + t.weight * c
                # float64 sum of squares without a float64 copy of the layer's output
                self.const += t.weight * float(torch.linalg.vector_norm(res, dtype=torch.float64).square())

    def _add_grams(self, product, a: torch.Tensor, b: torch.Tensor, same: bool) -> None:
        """Add the Grams of inputs ``a`` (teacher) and ``b`` (student); one product when they are the same."""
        grams: dict[str, torch.Tensor] = {"TT": product(a, a)}
        grams["SS"] = grams["TT"] if same else product(b, b)
        grams["TS"] = grams["TT"] if same else product(a, b)
        for key, g in grams.items():
            attr = f"G_{key}"
            setattr(self, attr, g.clone() if getattr(self, attr) is None else getattr(self, attr) + g)

    def system(self, terms: list[Term], wT: torch.Tensor) -> LeastSquares:
        """The objective as a least-squares system in W^S: row form while M is small, else Gram form."""
        wt = wT.flatten(1).double()  # (C_out, d)
        if self.U_T is not None:
            UT, US = torch.cat(self.U_T).double(), torch.cat(self.U_S).double()  # (M, d)
            A = torch.cat([math.sqrt(t.weight) * (t.r * UT + t.s * US) for t in terms])  # (terms*M, d)
            B = torch.cat([math.sqrt(t.weight) * (t.p * UT + t.q * US) for t in terms]) @ wt.T  # (terms*M, C_out)
            return RowSystem(A, B, self.rows)
        if self.direct:
            if list(terms) != list(self.terms) or not torch.equal(wT, self.wT):
                raise ValueError("LayerStats was built for another objective; pass the same terms and wT")
            # C = G W^T' + U'(Y - U W^T'): the first part from the same G as the quadratic term, so a
            # target that W^T reaches exactly is solved by W^T to rounding (no float32 mismatch between
            # G and C for the solve to amplify); the second part is small where the student is close
            C = self.G @ wt.T + self.C_res
            # sum w ||Y||^2 = tr(W G W') + 2 tr(W C_res) + sum w ||R||^2: no forward of the targets
            lin = 0.0 if isinstance(self.C_res, float) else float((wt * self.C_res.T).sum())
            const = float(((wt @ self.G) * wt).sum()) + 2 * lin
            return GramSystem(self.G, C, const + self.const, self.rows)
        G_TT, G_SS, G_TS = self.G_TT, self.G_SS, self.G_TS
        G_ST = G_TS.T
        G = torch.zeros_like(G_TT)
        cross = torch.zeros_like(G_TT)
        target = torch.zeros_like(G_TT)
        for t in terms:
            G += t.weight * (t.r**2 * G_TT + t.s**2 * G_SS + t.r * t.s * (G_TS + G_ST))
            cross += t.weight * (t.r * t.p * G_TT + t.r * t.q * G_TS + t.s * t.p * G_ST + t.s * t.q * G_SS)
            target += t.weight * (t.p**2 * G_TT + t.q**2 * G_SS + t.p * t.q * (G_TS + G_ST))
        C = cross @ wt.T  # (d, C_out)
        const = float(((wt @ target) * wt).sum())
        return GramSystem(G, C, const, self.rows)

    def free(self) -> None:
        self.G_TT = self.G_SS = self.G_TS = self.U_T = self.U_S = None
        self.G = self.C_res = 0.0


def _lstsq(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Minimum-norm least squares, correct for rank-deficient ``A`` (zero im2col columns, M < d).

    Not ``torch.linalg.lstsq``: its default CPU driver (gelsy) returns wrong, run-to-run
    different solutions for rank-deficient matrices (pytorch#92537) and CUDA's gels needs full rank.
    """
    return torch.linalg.pinv(A) @ B


def ridge_solve(G: torch.Tensor, R: torch.Tensor, ridge: float, prior: torch.Tensor | None = None) -> torch.Tensor:
    """``(G + lam I)^-1 (R + lam prior)`` with ``lam = ridge * mean diag(G)``: the package's one ridge solve.

    Numerical policy: float64 normal equations, Cholesky; where Cholesky fails
    (``G`` singular even with the ridge, e.g. all-zero inputs) the minimum-norm
    solution through the pseudo-inverse (:func:`_lstsq`). Every closed-form fit
    (the Gram systems, ThiNet's scales, FSKD's and FitNet's 1x1 fits) goes through here.
    Batched: ``G`` (B, d, d), ``R`` and ``prior`` (B, d, k) solve B systems at once, each
    with its own ``lam`` (the groups of a grouped conv).
    """
    G, R = G.double(), R.double()
    d = G.shape[-1]
    if d == 0:
        return R.clone()
    lam = ridge * G.diagonal(dim1=-2, dim2=-1).mean(-1)  # () or (B,)
    lam_m = lam[..., None, None]
    if prior is not None:
        R = R + lam_m * prior.double()
    A = G.clone()
    A.diagonal(dim1=-2, dim2=-1).add_(lam[..., None])  # G + lam I without an identity matrix
    L, info = torch.linalg.cholesky_ex(A)
    X = torch.cholesky_solve(R, L)
    bad = info != 0
    if G.dim() == 2:
        return _lstsq(A, R) if bool(bad) else X
    if bool(bad.any()):
        X[bad] = _lstsq(A[bad], R[bad])
    return X


def kept_columns(kept: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Column indices of ``w.flatten(1)`` that belong to the kept input channels."""
    kk = w[0, 0].numel() if w.dim() == 4 else 1
    return (kept[:, None] * kk + torch.arange(kk, device=kept.device)).flatten()


class LeastSquares:
    """``loss(W) = ||A W' - B||^2 / (M * C_out)`` with W = (C_out, d), in one of two representations."""

    rows: int

    def loss(self, W: torch.Tensor) -> float:
        raise NotImplementedError

    def diag(self) -> torch.Tensor:
        """diag(A'A), shape (d,)."""
        raise NotImplementedError

    def blocks(self, cols: torch.Tensor, kk: int) -> torch.Tensor:
        """Per-channel diagonal blocks of A'A restricted to ``cols``: (C, kk, kk)."""
        raise NotImplementedError

    def solve(self, cols: torch.Tensor, W0: torch.Tensor, ridge: float, row: int | None = None) -> torch.Tensor:
        """argmin over W[:, cols] of loss + lam ||W - W0||^2 with lam = ridge * mean diag(A'A)[cols].

        Returns (len(cols), C_out), or (len(cols), 1) for the single output ``row``.
        """
        raise NotImplementedError


class GramSystem(LeastSquares):
    def __init__(self, G: torch.Tensor, C: torch.Tensor, const: float, rows: int):
        self.G, self.C, self.const, self.rows = G, C, const, rows  # (d, d), (d, C_out)

    def loss(self, W):
        w = W.flatten(1).double()
        used = (w != 0).any(0).nonzero().flatten()  # a removed column adds nothing: the quadratic form on the rest
        G, C = self.G, self.C
        if len(used) < w.shape[1]:
            w, G, C = w[:, used], self._sub(used), C[used]
        val = ((w @ G) * w).sum() - 2 * (w * C.T).sum() + self.const
        return max(float(val), 0.0) / (self.rows * w.shape[0])

    def diag(self):
        return self.G.diagonal()

    def blocks(self, cols, kk):
        channels = cols[::kk] // kk  # cols are whole channels (kept_columns)
        G4 = self.G.view(self.G.shape[0] // kk, kk, -1, kk)
        return G4[channels, :, channels, :]  # (C, kk, kk): only the diagonal blocks are gathered

    def solve(self, cols, W0, ridge, row=None):
        C_K = self.C[cols] if row is None else self.C[cols, row : row + 1]
        W0_K = W0[:, cols].T if row is None else W0[row, cols][:, None]
        return ridge_solve(self._sub(cols), C_K, ridge, W0_K)

    def _sub(self, cols: torch.Tensor) -> torch.Tensor:
        """G restricted to ``cols`` (sorted, distinct): G itself when that is every column."""
        if len(cols) == self.G.shape[0]:
            return self.G
        return self.G.index_select(0, cols).index_select(1, cols)


class RowSystem(LeastSquares):
    def __init__(self, A: torch.Tensor, B: torch.Tensor, rows: int):
        self.A, self.B, self.rows = A, B, rows  # (terms*M, d), (terms*M, C_out)

    def loss(self, W):
        w = W.flatten(1).double()
        return float((self.A @ w.T - self.B).pow(2).sum()) / (self.rows * w.shape[0])

    def diag(self):
        return self.A.pow(2).sum(0)

    def blocks(self, cols, kk):
        Ak = self.A[:, cols].reshape(self.A.shape[0], -1, kk)  # (M, C, kk)
        return torch.einsum("mcx,mcy->cxy", Ak, Ak)

    def solve(self, cols, W0, ridge, row=None):
        # Woodbury: (lam I + A'A)^-1 R = (R - A'(lam I + A A')^-1 A R) / lam, with R = A'B + lam W0'
        Ak = self.A[:, cols]  # (M, dK)
        B = self.B if row is None else self.B[:, row : row + 1]
        W0_K = W0[:, cols].T if row is None else W0[row, cols][:, None]
        lam = ridge * float(Ak.pow(2).sum(0).mean())
        if lam <= 0:
            return _lstsq(Ak, B)
        R = Ak.T @ B + lam * W0_K
        K = Ak @ Ak.T + lam * torch.eye(Ak.shape[0], dtype=Ak.dtype, device=Ak.device)
        return (R - Ak.T @ torch.linalg.solve(K, Ak @ R)) / lam


@dataclass
class SolveResult:
    weight: torch.Tensor  # (C_out, C_in, kh, kw) float32, zeros outside the mask
    kept: torch.Tensor  # structured: kept input-channel indices; unstructured: boolean weight mask
    loss_before: float
    loss_after: float
    loss_masked: float | None = None  # objective at the masked start (start weights, same channels removed)
    rel_error: float | None = None  # sqrt(loss_after / loss at W = 0): the layer's relative output error
    fell_back: bool = False  # the solve ended above the masked start, which was kept instead


_TOL = 1e-6  # relative to the target energy: a solve is "worse" only beyond float rounding


def conditioned_ridge(ridge: float, rows: int, d: int, per_unknown: float | None = None) -> float:
    """The relative ridge for a system of ``rows`` output positions and ``d`` unknowns per output.

    ``per_unknown`` None: ``ridge * max(1, d / rows)``, unchanged while every weight
    sees at least one position per unknown, raised in proportion where the Gram
    matrix is rank deficient (1x1 convs on 2x2 maps, wide Linear layers on a few
    images). Else ``ridge + per_unknown * d / rows``: grows with the unknowns per
    row from the first unknown on, like the variance of an unregularised fit
    (about d / (rows - d)), so layers with many rows per weight stay close to
    ``ridge`` and layers with few get pulled towards their start weights.
    """
    ratio = d / max(rows, 1)
    if per_unknown is None:
        return ridge * max(1.0, ratio)
    return ridge + per_unknown * ratio


def effective_ridge(opts: LstsqOptions, rows: int, d: int) -> float:
    """The relative ridge of one solve with ``rows`` output positions and ``d`` unknowns per output."""
    ridge = conditioned_ridge(opts.ridge, rows, d) if opts.ridge_conditioned else opts.ridge
    return conditioned_ridge(ridge, rows, d, opts.ridge_per_unknown) if opts.ridge_per_unknown else ridge


def never_worse(
    system: LeastSquares, W: torch.Tensor, W0: torch.Tensor, keep_mask: torch.Tensor, loss_before: float
) -> SolveResult:
    """The solution ``W`` (C_out, d) or the masked start ``W0 * keep_mask``, whichever has the lower objective.

    ``keep_mask``: (d,) kept columns (structured) or (C_out, d) kept weights. The result's
    ``kept`` field is filled in by the caller.
    """
    Wm = W0 * keep_mask.to(W0.dtype)
    masked_all = bool(keep_mask.all()) and torch.equal(Wm, W0)  # nothing removed: loss_before is its loss
    loss_masked = loss_before if masked_all else system.loss(Wm)
    loss_after = system.loss(W)
    energy = system.loss(torch.zeros_like(W0))
    fell_back = loss_after > loss_masked + _TOL * energy  # rounding of an exact solve is not "worse"
    if fell_back:
        W, loss_after = Wm, loss_masked
    rel = math.sqrt(loss_after / energy) if energy > 0 else 0.0
    return SolveResult(W, torch.empty(0), loss_before, loss_after, loss_masked, rel, fell_back)


def channel_scores(W: torch.Tensor, system: LeastSquares, cols: torch.Tensor, kk: int, criterion: str):
    """Importance of each kept input channel of ``W`` (C_out, len(cols)).

    ``norm``: ||W[:, j]||_2 (the official ranking). ``energy``: sum_o w_oj' G_jj w_oj,
    the output energy channel j contributes on the few-shot inputs (scale-aware).
    """
    Wc = W.reshape(W.shape[0], -1, kk)  # (C_out, C, kk)
    if criterion == "norm":
        return Wc.pow(2).sum((0, 2)).sqrt()
    if criterion == "energy":
        return ((Wc.transpose(0, 1) @ system.blocks(cols, kk)) * Wc.transpose(0, 1)).sum((1, 2))  # (C,)
    raise ValueError(f"unknown channel criterion {criterion!r}; choose 'energy' or 'norm'")


def solve_structured(stats: LayerStats, problem: LayerProblem, opts: LstsqOptions | None = None) -> SolveResult:
    """Exact solve with ``problem.n_keep`` input channels, chosen by iterative elimination.

    Rule: solve with the current channel set, drop the lowest-scoring channels
    (``opts.channel_criterion``) down to the next count, re-solve; counts fall
    linearly from all channels to ``n_keep`` in ``opts.steps`` steps, then a
    final solve. ``problem.fixed``: input channels that are always kept (a
    concatenation consumer's slices that cannot be removed); ``n_keep`` counts them.
    """
    opts = opts or LstsqOptions()
    w0 = problem.w0
    system = stats.system(problem.terms, problem.wT)
    c_in = w0.shape[1]
    kk = w0[0, 0].numel() if w0.dim() == 4 else 1
    W0 = w0.flatten(1).double()  # (C_out, d)
    loss_before = system.loss(W0)
    keep = torch.arange(c_in, device=w0.device)
    pinned = torch.zeros(c_in, dtype=torch.bool, device=w0.device)
    if problem.fixed is not None:
        pinned[problem.fixed.to(w0.device)] = True
    n_keep = max(problem.n_keep, int(pinned.sum()))
    steps = opts.steps
    counts = [round(c_in - (c_in - n_keep) * (i + 1) / steps) for i in range(steps)] if n_keep < c_in else []
    W = W0
    for count in counts + [n_keep]:
        cols = kept_columns(keep, w0)
        W = torch.zeros_like(W0)
        W[:, cols] = system.solve(cols, W0, effective_ridge(opts, system.rows, len(cols))).T
        if count < len(keep):
            scores = channel_scores(W[:, cols], system, cols, kk, opts.channel_criterion)
            scores = scores.masked_fill(pinned[keep], float("inf"))
            keep = select_channels(keep, scores, count, problem.channel_groups, n_keep, problem.ties)
    keep_cols = torch.zeros(W0.shape[1], dtype=torch.bool, device=W0.device)
    keep_cols[kept_columns(keep, w0)] = True
    res = never_worse(system, W, W0, keep_cols, loss_before)
    res.weight, res.kept = res.weight.reshape(w0.shape).float(), keep
    return res


def weight_mask(W: torch.Tensor, diag: torch.Tensor | None, n_keep: int, criterion: str) -> torch.Tensor:
    """Top-``n_keep`` weights of the whole layer: ``magnitude`` |w| (official) or ``energy`` w^2 G_ii."""
    if criterion == "magnitude" or diag is None:
        score = W.abs()
    elif criterion == "energy":
        score = W.pow(2) * diag[None, :]
    else:
        raise ValueError(f"unknown weight criterion {criterion!r}; choose 'magnitude' or 'energy'")
    mask = torch.zeros(W.numel(), dtype=torch.bool, device=W.device)
    mask[score.flatten().topk(n_keep).indices] = True
    return mask.view_as(W)


def solve_unstructured(
    stats: LayerStats, problem: LayerProblem, opts: LstsqOptions | None = None, mask: torch.Tensor | None = None
) -> SolveResult:
    """Exact solve for a fixed weight mask: one ridge least-squares problem per output row.

    The mask is the top ``problem.n_keep`` weights by ``opts.weight_criterion``,
    or ``mask`` (boolean, shape of ``w0``) if given.
    """
    opts = opts or LstsqOptions()
    w0 = problem.w0
    system = stats.system(problem.terms, problem.wT)
    W0 = w0.flatten(1).double()
    loss_before = system.loss(W0)
    if mask is None:
        mask = weight_mask(W0, system.diag(), problem.n_keep, opts.weight_criterion)
    else:
        mask = mask.reshape(W0.shape).to(W0.device)
    W = torch.zeros_like(W0)
    for o in range(W0.shape[0]):
        idx = mask[o].nonzero().flatten()
        if len(idx):
            W[o, idx] = system.solve(idx, W0, effective_ridge(opts, system.rows, len(idx)), row=o)[:, 0]
    res = never_worse(system, W, W0, mask, loss_before)
    res.weight, res.kept = res.weight.reshape(w0.shape).float(), mask.reshape(w0.shape)
    return res


def _group_view(layer: nn.Conv2d) -> nn.Conv2d:
    """One group of a grouped conv as a groups=1 conv with the same geometry, for :class:`LayerStats`
    (weights on the meta device: only its shape and conv parameters are read)."""
    cin_g, cout_g = layer.in_channels // layer.groups, layer.out_channels // layer.groups
    return nn.Conv2d(
        cin_g,
        cout_g,
        layer.kernel_size,
        layer.stride,
        layer.padding,
        layer.dilation,
        bias=False,
        padding_mode=layer.padding_mode,
        device="meta",
    )


def solve_grouped(
    layer: nn.Conv2d,
    problem: LayerProblem,
    hT: torch.Tensor | Batches,
    hS: torch.Tensor | Batches,
    opts: LstsqOptions | None = None,
) -> SolveResult:
    """Re-fit a grouped (or depthwise) conv: its weight is block-diagonal, so each group is its own problem.

    Group g maps input channels ``g*C_in/G ... (g+1)*C_in/G`` to output channels
    ``g*C_out/G ...``. Structured: no input channel is removed here (``kept`` =
    all; ``fixed`` plays no part) and all groups are solved at once
    (:func:`_solve_groups_batched`: one im2col, batched Grams, one batched
    Cholesky). Unstructured: the top ``n_keep`` weights of the whole layer by
    magnitude are kept and each group is solved on its part of that mask.
    Losses are summed over groups and normalised like a dense layer's.
    """
    opts = opts or LstsqOptions()
    if problem.structured:
        return _solve_groups_batched(layer, problem, hT, hS, opts)
    wT, w0, bs = problem.wT, problem.w0, opts.batch_size
    G = layer.groups
    view = _group_view(layer)
    cin_g, cout_g = wT.shape[1], wT.shape[0] // G
    mask = weight_mask(w0.flatten(1), None, problem.n_keep, opts.weight_criterion).view_as(w0)
    W = torch.empty_like(w0)
    before = after = masked = energy = 0.0
    fell_back = False
    for g in range(G):
        i, o = slice(g * cin_g, (g + 1) * cin_g), slice(g * cout_g, (g + 1) * cout_g)
        stats = LayerStats(view)
        for xT, xS in pairs(hT, hS, bs):
            stats.add_batch(xT[:, i], xS[:, i])
        group = LayerProblem(problem.terms, wT[o], w0[o], 0, structured=False)
        res = solve_unstructured(stats, group, opts, mask=mask[o])
        stats.free()
        W[o] = res.weight
        before += res.loss_before * cout_g
        after += res.loss_after * cout_g
        masked += res.loss_masked * cout_g
        energy += (res.loss_after / res.rel_error**2 if res.rel_error else 0.0) * cout_g
        fell_back |= res.fell_back
    rel = math.sqrt(after / energy) if energy > 0 else 0.0
    n = w0.shape[0]
    return SolveResult(W, mask, before / n, after / n, masked / n, rel, fell_back)


@dataclass
class GroupSystems:
    """Per-group least-squares statistics of a grouped conv, all input channels kept: objective of group g
    at W_g (cout_g, dg) is ``W_g A_g W_g' - 2 W_g . C_g' + const_g`` over ``rows`` output positions."""

    A: torch.Tensor  # (G, dg, dg)
    C: torch.Tensor  # (G, dg, cout_g)
    const: torch.Tensor  # (G,)
    rows: int

    def __add__(self, other: GroupSystems) -> GroupSystems:  # the statistics of both image sets
        return GroupSystems(self.A + other.A, self.C + other.C, self.const + other.const, self.rows + other.rows)

    def loss(self, W: torch.Tensor) -> torch.Tensor:
        """(G,) un-normalised objective per group of W (G, cout_g, dg)."""
        quad = torch.einsum("god,gde,goe->g", W, self.A, W) - 2 * torch.einsum("god,gdo->g", W, self.C) + self.const
        return quad.clamp_min(0)

    def solve(self, W0: torch.Tensor, opts: LstsqOptions) -> torch.Tensor:
        """Every group's ridge solve towards W0 (G, cout_g, dg) at once: (G, cout_g, dg)."""
        ridge = effective_ridge(opts, self.rows, W0.shape[2])
        return ridge_solve(self.A, self.C, ridge, W0.transpose(1, 2)).transpose(1, 2)


def group_systems(
    layer: nn.Conv2d, problem: LayerProblem, hT: torch.Tensor | Batches, hS: torch.Tensor | Batches, batch_size: int
) -> GroupSystems:
    """:class:`GroupSystems` of a grouped conv on the images ``hT`` / ``hS``.

    The per-group Grams come from :func:`crossdistill.gram.gram` (batched over
    groups; depthwise convs as elementwise products, no im2col at stride 1);
    images go through in chunks of at most ~256 MB of im2col-equivalent.
    """
    terms, wT, w0 = problem.terms, problem.wT, problem.w0
    G, kk = layer.groups, w0[0, 0].numel()
    cin_g, cout_g = wT.shape[1], wT.shape[0] // G
    dg = cin_g * kk
    pad = explicit_padding(layer)
    if layer.padding_mode != "zeros":
        raise TypeError("only convolutions with zero padding are supported by the least-squares solver")
    # LayerStats' direct statistics, per group: Grams of the student-side inputs only, the linear part as
    # A W^T' plus a backward-weight grouped conv against the residual, the targets' energy from both
    A = torch.zeros(G, dg, dg, dtype=torch.float64, device=w0.device)
    C_res = torch.zeros(G, dg, cout_g, dtype=torch.float64, device=w0.device)
    const = torch.zeros(G, dtype=torch.float64, device=w0.device)
    rows = 0
    item = torch.empty((), dtype=hT.dtype).element_size()
    per_image = math.prod(hT.shape[1:]) * kk * item  # im2col bytes per image (stride 1; less otherwise)
    chunk = max(1, min(batch_size, (256 * 2**20) // max(per_image, 1)))
    for xT, xS in pairs(hT, hS, chunk):
        grams: dict[int, torch.Tensor] = {}
        conv = lambda h: F.conv2d(h, wT, None, layer.stride, pad, layer.dilation, G)  # noqa: E731
        for t in terms:
            x = _mix(xT, xS, t.r, t.s)
            if id(x) not in grams:
                grams[id(x)] = gram(layer, x).view(G, dg, dg)
            A += t.weight * grams[id(x)]
            a, b = _residual_mix(t)
            if a or b:
                res = conv(_mix(xT, xS, a, b))  # (n, C_out, ...)
                C_res += t.weight * weight_product(layer, x, res)
                per_group = torch.linalg.vector_norm(res.reshape(len(xT), G, -1), dim=(0, 2), dtype=torch.float64)
                const += t.weight * per_group.square()
        rows += output_rows(layer, xT)
    wt = wT.reshape(G, cout_g, dg).double()
    C = A @ wt.transpose(1, 2) + C_res  # (G, dg, cout_g), as in LayerStats
    const = const + ((wt @ A) * wt).sum((1, 2)) + 2 * (wt * C_res.transpose(1, 2)).sum((1, 2))
    return GroupSystems(A, C, const, rows)


def groups_result(systems: GroupSystems, W: torch.Tensor, W0: torch.Tensor, shape: torch.Size) -> SolveResult:
    """The result of the group solutions W (G, cout_g, dg), a group whose objective ends above its start
    W0 keeping its start weights (all input channels kept)."""
    before, after = systems.loss(W0), systems.loss(W)
    worse = after > before + _TOL * systems.const.clamp_min(0)
    W = torch.where(worse[:, None, None], W0, W)
    after = torch.minimum(after, before)
    norm = systems.rows * shape[0]
    energy = float(systems.const.clamp_min(0).sum())
    loss_after = float(after.sum()) / norm
    rel = math.sqrt(float(after.sum()) / energy) if energy > 0 else 0.0
    kept = torch.arange(shape[1], device=W0.device)
    loss_before = float(before.sum()) / norm
    return SolveResult(W.reshape(shape).float(), kept, loss_before, loss_after, loss_before, rel, bool(worse.any()))


def _solve_groups_batched(
    layer: nn.Conv2d, problem: LayerProblem, hT: torch.Tensor | Batches, hS: torch.Tensor | Batches, opts: LstsqOptions
) -> SolveResult:
    """Every group of a grouped conv at once, all input channels kept: Grams (G, d_g, d_g), one batched solve.

    A group whose solve ends above its start keeps its start weights.
    """
    systems = group_systems(layer, problem, hT, hS, opts.batch_size)
    w0 = problem.w0
    W0 = w0.reshape(layer.groups, -1, systems.A.shape[1]).double()
    return groups_result(systems, systems.solve(W0, opts), W0, w0.shape)


def adam_solve(
    layer: nn.Module, problem: LayerProblem, hT: torch.Tensor, hS: torch.Tensor, opts: AdamOptions | None = None
) -> SolveResult:
    """The official optimisation: full-batch Adam with a gradually tightening mask.

    Structured: input channels ranked by ||W[:, j]||_2; the kept count falls
    linearly from all to ``n_keep`` over the first third of the iterations
    (hard projection at each drop), then the mask is fixed and the lr drops to
    ``lr_drop * lr``. Unstructured: per-layer magnitude top-k with the kept
    count falling the same way, no lr drop. The mask is applied to the
    weights, the gradients and both Adam moments. The teacher-side products
    W^T*(p h^T + q h^S) are computed once (the official loop recomputes them).
    ``problem.fixed``: input channels always kept (structured). Grouped convs
    work as they are (the layer's own grouped convolution).
    """
    opts = opts or AdamOptions()
    terms, wT, w0, n_keep = problem.terms, problem.wT, problem.w0, problem.n_keep
    structured, fixed = problem.structured, problem.fixed
    iterations, lr, lr_drop = opts.iterations, opts.lr, opts.lr_drop
    fn = layer_fn(layer)
    with torch.no_grad():
        targets = [fn(t.p * hT + t.q * hS, wT) for t in terms]
    inputs = [t.r * hT + t.s * hS for t in terms]
    W = w0.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([W], lr=lr)
    c_in = w0.shape[1]
    total = c_in if structured else w0.numel()
    mask = torch.ones_like(w0, dtype=torch.bool)
    chan = torch.ones(c_in, dtype=torch.bool, device=w0.device)
    ramp = max(iterations // 3, 1)

    def loss_of(weight):
        return sum(t.weight * F.mse_loss(fn(x, weight), y) for t, x, y in zip(terms, inputs, targets, strict=True))

    with torch.no_grad():
        loss_before = float(loss_of(W))
    current = total
    for it in range(iterations):
        count = max(n_keep, math.ceil(total - (total - n_keep) * min(it + 1, ramp) / ramp))
        if count < current:
            current = count
            with torch.no_grad():
                if structured:
                    norms = (W * mask).pow(2).transpose(0, 1).reshape(c_in, -1).sum(1)
                    if fixed is not None:
                        norms[fixed] = float("inf")
                    chan = torch.zeros(c_in, dtype=torch.bool, device=W.device)
                    every = torch.arange(c_in, device=W.device)
                    chan[select_channels(every, norms, count, problem.channel_groups, n_keep, problem.ties)] = True
                    mask = chan.view(1, -1, *([1] * (W.dim() - 2))).expand_as(W)
                else:
                    mask = weight_mask(W * mask, None, count, "magnitude")
                W.mul_(mask)
                for state in opt.state.values():
                    state["exp_avg"].mul_(mask)
                    state["exp_avg_sq"].mul_(mask)
        if structured and it == ramp:
            for group in opt.param_groups:
                group["lr"] = lr * lr_drop
        loss = loss_of(W)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        W.grad.mul_(mask)
        opt.step()
        with torch.no_grad():
            W.mul_(mask)
    with torch.no_grad():
        loss_after = float(loss_of(W))
        start = w0 * mask  # the masked start: pruning without re-fit
        loss_masked = float(loss_of(start))
        energy = float(sum(t.weight * y.pow(2).mean() for t, y in zip(terms, targets, strict=True)))
    fell_back = loss_after > loss_masked + _TOL * energy
    W = start.clone() if fell_back else W.detach()
    loss_after = min(loss_after, loss_masked)
    rel = math.sqrt(loss_after / energy) if energy > 0 else 0.0
    kept = chan.nonzero().flatten() if structured else mask
    return SolveResult(W, kept, loss_before, loss_after, loss_masked, rel, fell_back)
