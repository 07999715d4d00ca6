"""Gram matrices ``U_a' U_b`` of a layer's im2col, mostly without building the im2col.

``U_a`` is the im2col of input ``a`` (rows = output positions, columns =
``C_in*kh*kw`` in the order of ``W.flatten(1)``), so ``U_a' U_b`` is the
(d, d) statistic every least-squares objective needs. Building ``U`` costs a
copy of ``kh*kw`` times the input and the product ``kh*kw`` squared times
more flops than the layer's own forward; three structures make it cheaper:

- 1x1 convs and Linear layers: ``U`` is the input itself (channels first), one product.
- Stride-1 convs: block (tap i, tap j) of the Gram is the correlation of the two
  inputs at offset ``D = j - i``, summed over the positions tap i reads. One
  product per offset over every position where both values exist (25 for a
  3x3 kernel instead of 81 blocks), minus thin strips at the border that tap
  i does not read, gives all blocks with the offset: about 3x fewer flops,
  and when ``a is b`` only the upper blocks are computed (block (j, i) is
  block (i, j) transposed). Offsets shared by one block only are summed directly.
- Grouped convs: the same, batched over groups. Depthwise convs (one channel
  per group), any stride: one product map per tap offset summed over the
  images, then each block is a sum over that map (no im2col, no tiny matmuls).

Other convs (stride > 1, kernel > 1) use the im2col. Products run in the
input's dtype; blocks are combined in float64, so subtracting the strips
loses nothing to cancellation. The result is float64, shape (d, d), or
(G, d_g, d_g) for a conv with G groups.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["gram", "output_rows", "explicit_padding"]


def explicit_padding(layer) -> tuple[int, ...]:
    """A conv's padding as numbers: 'valid' is 0, 'same' (odd effective kernel) is (k-1)*d/2 per side."""
    if layer.padding == "valid":
        return (0, 0)
    if layer.padding == "same":
        pads = [(k - 1) * d for k, d in zip(layer.kernel_size, layer.dilation, strict=True)]
        if any(p % 2 for p in pads):
            raise TypeError("padding='same' with an even kernel (asymmetric padding) is not supported")
        return tuple(p // 2 for p in pads)
    return layer.padding


def _out_size(n: int, k: int, dil: int, pad: int, stride: int) -> int:
    return (n + 2 * pad - dil * (k - 1) - 1) // stride + 1


def output_rows(layer: nn.Module, h: torch.Tensor) -> int:
    """Rows of the im2col of ``h`` (output positions over the batch) without building it."""
    if isinstance(layer, nn.Linear):
        return h.numel() // h.shape[-1]
    pad = explicit_padding(layer)
    sizes = [
        _out_size(n, k, d, p, s)
        for n, k, d, p, s in zip(h.shape[-2:], layer.kernel_size, layer.dilation, pad, layer.stride, strict=True)
    ]
    return h.shape[0] * sizes[0] * sizes[1]


def _grouped_channels_first(h: torch.Tensor, groups: int) -> torch.Tensor:
    """(N, C, H, W) -> (G, C/G, N, H, W): each group's channels first, for per-group products."""
    n, c = h.shape[:2]
    return h.view(n, groups, c // groups, *h.shape[2:]).permute(1, 2, 0, 3, 4)


def _product(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """sum over the trailing dims of x_c * y_c': (G, c, ...) x (G, c, ...) -> (G, c, c) float64."""
    g, c = x.shape[:2]
    xs, ys = x.reshape(g, c, -1), y.reshape(g, c, -1)
    if c == 1:  # depthwise: a dot product per group
        return torch.einsum("gcm,gcm->gc", xs, ys).double()[:, :, None]
    return torch.bmm(xs, ys.transpose(1, 2)).double()


def _interval_minus(full: tuple[int, int], keep: tuple[int, int]) -> list[tuple[int, int]]:
    """The parts of [full) outside [keep) (keep is clipped to full): at most two intervals."""
    lo, hi = full
    a, b = max(lo, keep[0]), min(hi, keep[1])
    if a >= b:
        return [full] if lo < hi else []
    return [iv for iv in ((lo, a), (b, hi)) if iv[0] < iv[1]]


def _shift_gram(x: torch.Tensor, y: torch.Tensor, same: bool, layer: nn.Conv2d) -> torch.Tensor:
    """Stride-1 conv Gram from per-offset correlations. ``x``, ``y``: (G, c, N, H, W)."""
    g, c, _, H, W = x.shape
    kh, kw = layer.kernel_size
    dh, dw = layer.dilation
    ph, pw = explicit_padding(layer)
    ho, wo = _out_size(H, kh, dh, ph, 1), _out_size(W, kw, dw, pw, 1)
    taps = [(i, j) for i in range(kh) for j in range(kw)]
    kk = len(taps)
    # every image followed by zero rows and columns as wide as the largest offset: in the flattened
    # (G, c, N*Hp*Wp) layout an offset (dr, dc) is one shift by dr*Wp + dc that never wraps onto another
    # value, so a full correlation is one product of two strided views, no copy
    hp, wp = H + (kh - 1) * dh, W + (kw - 1) * dw
    xp = F.pad(x, (0, wp - W, 0, hp - H)).contiguous()  # (G, c, N, Hp, Wp)
    yp = xp if same else F.pad(y, (0, wp - W, 0, hp - H)).contiguous()
    xf, yf = xp.view(g, c, -1), yp.view(g, c, -1)
    length = xf.shape[-1]
    out = torch.zeros(g, c, kk, c, kk, dtype=torch.float64, device=x.device)
    full: dict[tuple[int, int], torch.Tensor] = {}
    strips: dict[tuple, torch.Tensor] = {}

    def full_corr(dr: int, dc: int) -> torch.Tensor:
        """sum over every q where x(q) and y(q + (dr, dc)) both exist of x(q) y(q + D)'."""
        if (dr, dc) not in full:
            shift = dr * wp + dc
            lo, hi = max(0, -shift), min(length, length - shift)
            full[(dr, dc)] = _product(xf[..., lo:hi], yf[..., lo + shift : hi + shift])
        return full[(dr, dc)]

    def rect(rows: tuple[int, int], cols: tuple[int, int], dr: int, dc: int) -> torch.Tensor:
        """the same sum over q in rows x cols only (thin border strips), cached."""
        key = (rows, cols, dr, dc)
        if key not in strips:
            (r0, r1), (c0, c1) = rows, cols
            xs = xp[..., r0:r1, c0:c1]
            strips[key] = _product(xs, yp[..., r0 + dr : r1 + dr, c0 + dc : c1 + dc])
        return strips[key]

    for t1 in range(kk):
        for t2 in range(t1 if same else 0, kk):
            (i1, j1), (i2, j2) = taps[t1], taps[t2]
            dr, dc = (i2 - i1) * dh, (j2 - j1) * dw
            full_r, full_c = (max(0, -dr), min(H, H - dr)), (max(0, -dc), min(W, W - dc))
            if full_r[0] >= full_r[1] or full_c[0] >= full_c[1]:
                continue  # the offset exceeds the map: the block stays zero
            # tap (i1, j1) reads input rows i1*dh - ph ... + ho (and columns alike); the positions of
            # the full correlation outside that window are subtracted (inclusion-exclusion at corners)
            out_r = _interval_minus(full_r, (i1 * dh - ph, i1 * dh - ph + ho))
            out_c = _interval_minus(full_c, (j1 * dw - pw, j1 * dw - pw + wo))
            block = full_corr(dr, dc).clone()
            for r in out_r:
                block -= rect(r, full_c, dr, dc)
            for cc in out_c:
                block -= rect(full_r, cc, dr, dc)
            for r in out_r:
                for cc in out_c:
                    block += rect(r, cc, dr, dc)
            out[:, :, t1, :, t2] = block
            if same and t2 != t1:
                out[:, :, t2, :, t1] = block.transpose(1, 2)
    return out.view(g, c * kk, c * kk)


def _depthwise_gram(x: torch.Tensor, y: torch.Tensor, same: bool, layer: nn.Conv2d) -> torch.Tensor:
    """Gram of a conv with one input channel per group (depthwise), any stride: (G, kk, kk).

    Per offset D between two taps, the product map ``P_D(q) = sum_n x(q) y(q + D)`` (G, h, w) over
    every position where both exist; block (i, j) is the sum of P_D over the positions tap i reads
    (every stride-th one, inside its window). The images are summed once per offset (13 for a 3x3
    kernel when ``a is b``), not once per pair of taps, and nothing like an im2col is built.
    ``x``, ``y``: (G, 1, N, H, W).
    """
    g, _, _, H, W = x.shape
    kh, kw = layer.kernel_size
    dh, dw = layer.dilation
    ph, pw = explicit_padding(layer)
    sh, sw = layer.stride
    ho, wo = _out_size(H, kh, dh, ph, sh), _out_size(W, kw, dw, pw, sw)
    taps = [(i, j) for i in range(kh) for j in range(kw)]
    kk = len(taps)
    out = torch.zeros(g, kk, kk, dtype=torch.float64, device=x.device)
    maps: dict[tuple[int, int], torch.Tensor] = {}

    def first_last(start: int, stride: int, n_out: int, lo: int, hi: int) -> tuple[int, int] | None:
        """Index range [first, last] of the positions start + o*stride (o < n_out) inside [lo, hi)."""
        o0 = max(0, -((start - lo) // stride))  # ceil((lo - start) / stride)
        o1 = min(n_out - 1, (hi - 1 - start) // stride)
        return (start + o0 * stride, start + o1 * stride) if o0 <= o1 else None

    for t1 in range(kk):
        for t2 in range(t1 if same else 0, kk):
            (i1, j1), (i2, j2) = taps[t1], taps[t2]
            dr, dc = (i2 - i1) * dh, (j2 - j1) * dw
            full_r, full_c = (max(0, -dr), min(H, H - dr)), (max(0, -dc), min(W, W - dc))
            rows = first_last(i1 * dh - ph, sh, ho, *full_r)
            cols = first_last(j1 * dw - pw, sw, wo, *full_c)
            if rows is None or cols is None:
                continue  # tap i1 reads no position where both values exist: the block stays zero
            if (dr, dc) not in maps:
                (r0, r1), (c0, c1) = full_r, full_c
                prod = x[:, 0, :, r0:r1, c0:c1] * y[:, 0, :, r0 + dr : r1 + dr, c0 + dc : c1 + dc]
                maps[(dr, dc)] = prod.sum(1).double()  # (G, h, w): summed over the images
            m = maps[(dr, dc)]
            rs = slice(rows[0] - full_r[0], rows[1] - full_r[0] + 1, sh)
            cs = slice(cols[0] - full_c[0], cols[1] - full_c[0] + 1, sw)
            out[:, t1, t2] = m[:, rs, cs].sum((1, 2))
            if same and t2 != t1:
                out[:, t2, t1] = out[:, t1, t2]
    return out


def _im2col_gram(a: torch.Tensor, b: torch.Tensor, same: bool, layer: nn.Conv2d) -> torch.Tensor:
    """The straightforward Gram through F.unfold, per group: (G, d_g, d_g) float64."""
    pad = explicit_padding(layer)
    g = layer.groups

    def cols(h: torch.Tensor) -> torch.Tensor:  # (G, d_g, N*L)
        u = F.unfold(h, layer.kernel_size, layer.dilation, pad, layer.stride)  # (N, C*kk, L)
        return u.view(u.shape[0], g, u.shape[1] // g, -1).permute(1, 2, 0, 3).reshape(g, u.shape[1] // g, -1)

    ua = cols(a)
    ub = ua if same else cols(b)
    if ua.shape[1] == 1:
        return torch.einsum("gdm,gdm->gd", ua, ub).double()[:, :, None]
    return torch.bmm(ua, ub.transpose(1, 2)).double()


def gram(layer: nn.Module, a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``U_a' U_b`` summed over the batch (``b`` None: ``a`` itself): float64 (d, d), or (G, d_g, d_g)
    for a conv with ``groups`` G > 1. Column order: ``W.flatten(1)`` (of one group)."""
    same = b is None or b is a
    b = a if same else b
    if isinstance(layer, nn.Linear):
        A, B = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])  # (M, F)
        return (A.T @ B).double()
    if not isinstance(layer, nn.Conv2d):
        raise TypeError(f"cannot build a Gram matrix for layer type {type(layer).__name__}")
    if layer.padding_mode != "zeros":
        raise TypeError("only convolutions with zero padding are supported by the least-squares solver")
    groups, pad = layer.groups, explicit_padding(layer)
    G = None
    if tuple(layer.kernel_size) == (1, 1) and tuple(pad) == (0, 0):
        sh, sw = layer.stride
        if (sh, sw) != (1, 1):  # a strided 1x1 conv reads every s-th position
            a, b = a[..., ::sh, ::sw], b[..., ::sh, ::sw]
        x = _grouped_channels_first(a, groups)  # (G, c, N, H, W)
        G = _product(x, x if same else _grouped_channels_first(b, groups))
    elif layer.in_channels == groups:  # depthwise: one input channel per group
        x = _grouped_channels_first(a, groups)
        G = _depthwise_gram(x, x if same else _grouped_channels_first(b, groups), same, layer)
    elif tuple(layer.stride) == (1, 1):
        x = _grouped_channels_first(a, groups)
        G = _shift_gram(x, x if same else _grouped_channels_first(b, groups), same, layer)
    else:
        G = _im2col_gram(a, b, same, layer)
    return G[0] if groups == 1 else G
