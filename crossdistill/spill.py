"""Activations over all images, kept batch by batch: in memory while they fit, else on disk.

At real sizes one layer's input over all images is gigabytes (MobileNetV2 at
224x224: 96x112x112 floats per image, 4.8 GB for 1,000 images), and a
layer step holds two of them (h^T and h^S) besides the kept values of the
graph streams. Everything that consumes them works batch by batch
(:class:`crossdistill.solvers.LayerStats`, the grouped solve), so a
:class:`Batches` over the limit (``CompressConfig.spill_mb``) writes each
batch to a file in a temporary directory as it is produced and reads it
back when iterated: peak memory is then a few batches, whatever N. On disk
in float32, as computed (no half precision): the statistics are exactly
those of the in-memory run. The directory is removed with the object.

Files hold a tensor's raw bytes (:func:`save_raw`), its shape and dtype kept
in memory (``torch.save`` pickles and computes a CRC-32 of every record).
With :class:`crossdistill.capture.GraphStream` writing a kept value once,
spilling everything past 20 MB cost efficientnet_b0 (200 images at 112x112)
about 1 teacher pass before and none measurable after
(benchmarks/results/spill_format.md).
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

__all__ = ["Batches", "batches", "pairs", "materialize", "nbytes", "save_raw", "load_raw"]

Meta = tuple[torch.Size, torch.dtype]


def nbytes(x: torch.Tensor) -> int:
    return x.numel() * x.element_size()


def save_raw(x: torch.Tensor, path: Path) -> Meta:
    """``x``'s bytes to ``path`` as they lie in memory (no header, no checksum); returns what :func:`load_raw`
    needs to read them back. The file is scratch space of this process, never a user's file."""
    x = x.detach().cpu().contiguous()  # a view would write its whole base tensor
    # a new file, never the old one rewritten in place: a tensor load_raw mapped from it may still be alive
    Path(path).unlink(missing_ok=True)
    x.reshape(-1).view(torch.uint8).numpy().tofile(path)
    return x.shape, x.dtype


def load_raw(path: Path, meta: Meta, device: torch.device | None = None) -> torch.Tensor:
    """The tensor :func:`save_raw` wrote (memory-mapped copy-on-write: the file may be removed after)."""
    shape, dtype = meta
    n = math.prod(shape)
    x = torch.from_file(str(path), shared=False, size=n, dtype=dtype) if n else torch.empty(0, dtype=dtype)
    x = x.view(shape)
    return x if device is None or device.type == "cpu" else x.to(device)


class Batches:
    """A tensor (N, ...) stored as its batches along dim 0; ``on_disk``: each batch in a file of ``folder``."""

    def __init__(self, on_disk: bool):
        self.parts: list[torch.Tensor | tuple[Path, Meta]] = []
        self.sizes: list[int] = []
        self.folder = tempfile.TemporaryDirectory(prefix="crossdistill-") if on_disk else None
        self.device: torch.device | None = None
        self.shape: tuple[int, ...] = ()
        self.dtype: torch.dtype | None = None

    def append(self, x: torch.Tensor) -> None:
        if not self.parts:
            self.device, self.dtype = x.device, x.dtype
        self.sizes.append(len(x))
        self.shape = (sum(self.sizes), *x.shape[1:])
        if self.folder is None:
            self.parts.append(x)
            return
        path = Path(self.folder.name) / f"{len(self.parts)}.bin"
        self.parts.append((path, save_raw(x, path)))

    def __len__(self) -> int:
        return self.shape[0] if self.shape else 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        for p in self.parts:
            yield p if isinstance(p, torch.Tensor) else load_raw(*p, self.device)

    def cat(self) -> torch.Tensor:
        parts = list(self)
        return parts[0] if len(parts) == 1 else torch.cat(parts)  # one batch: no copy


def materialize(h: torch.Tensor | Batches) -> torch.Tensor:
    """``h`` as one tensor (the solvers that need every image at once: Adam)."""
    return h.cat() if isinstance(h, Batches) else h


def _parts(h: torch.Tensor | Batches, sizes: list[int]) -> Iterator[torch.Tensor]:
    """``h`` cut into consecutive parts of ``sizes`` images (a Batches with other sizes is an error)."""
    if isinstance(h, Batches):
        if h.sizes != sizes:
            raise ValueError("the teacher's and the student's inputs are stored in different batches")
        yield from h
        return
    j = 0
    for s in sizes:
        yield h[j : j + s]
        j += s


def batches(h: torch.Tensor | Batches, size: int) -> Iterator[torch.Tensor]:
    """``h`` in consecutive batches of at most ``size`` images (a stored batch is split, never joined)."""
    for x, _ in pairs(h, h, size):
        yield x


def pairs(
    hT: torch.Tensor | Batches, hS: torch.Tensor | Batches, size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Matching batches of at most ``size`` images of the teacher's and the student's inputs, cut at the
    same images; the same tensor twice when ``hS is hT``."""
    stored = [h.sizes for h in (hT, hS) if isinstance(h, Batches)]
    sizes = stored[0] if stored else [len(hT)]
    parts_S = _parts(hS, sizes) if hS is not hT else None
    for pT in _parts(hT, sizes):
        pS = pT if parts_S is None else next(parts_S)
        for j in range(0, len(pT), size):
            xT = pT[j : j + size]
            yield xT, (xT if pS is pT else pS[j : j + size])
