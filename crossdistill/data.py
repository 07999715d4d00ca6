"""Data sets: Fashion-MNIST / MNIST (idx), CIFAR-10/100 (python pickle), image folders.

Every loader returns a :class:`TensorDataset`-like pair of uint8 images
``(N, C, H, W)`` and int64 labels; normalisation happens on the fly in
:func:`normalize` so that the few-shot images, the test split and a user's
images go through one code path.

Normalisation per data set (mean/std per channel, on [0, 1] pixels):
Fashion-MNIST (0.2860, 0.3530), MNIST (0.1307, 0.3081), CIFAR-10
((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)), CIFAR-100
((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)).
Augmentation (teacher training and BP fine-tuning only): random crop with
zero padding (2 px for 28x28, 4 px for 32x32) and horizontal flip.
"""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
import tarfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import UserError
from .files import atomic_write, file_digest

__all__ = [
    "Split",
    "DatasetInfo",
    "DATASETS",
    "load_dataset",
    "load_idx",
    "load_cifar",
    "load_image_folder",
    "few_shot",
    "normalize",
    "normalize_with",
    "augment",
    "default_cache_dir",
    "dataset_info",
    "download",
    "verify_checksum",
    "load_few_shot",
    "few_shot_indices",
    "load_validation",
]


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    in_channels: int
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pad: int  # random-crop padding for augmentation


DATASETS: dict[str, DatasetInfo] = {
    "fashion-mnist": DatasetInfo("fashion-mnist", 10, 1, 28, (0.2860,), (0.3530,), 2),
    "mnist": DatasetInfo("mnist", 10, 1, 28, (0.1307,), (0.3081,), 2),
    "cifar10": DatasetInfo("cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 4),
    "cifar100": DatasetInfo("cifar100", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 4),
}


@dataclass
class Split:
    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)


def dataset_info(name: str) -> DatasetInfo:
    key = name.lower().replace("_", "-")
    key = {"fashionmnist": "fashion-mnist", "cifar-10": "cifar10", "cifar-100": "cifar100"}.get(key, key)
    if key not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)} (or --images DIR)")
    return DATASETS[key]


def default_cache_dir() -> Path:
    """Per-user cache: ``$CROSSDISTILL_CACHE`` or ``$XDG_CACHE_HOME/crossdistill`` or ``~/.cache/crossdistill``."""
    if os.environ.get("CROSSDISTILL_CACHE"):
        return Path(os.environ["CROSSDISTILL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "crossdistill"


# --------------------------------------------------------------------------- transforms


def normalize(images: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    """uint8 (N,C,H,W) -> float32 normalised with the data set's mean/std."""
    return normalize_with(images, info.mean, info.std)


def normalize_with(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float ``(x/255 - mean) / std``; one value broadcasts to every channel."""
    x = images.float().div(255)
    c = x.shape[1]
    for name, v in (("mean", mean), ("std", std)):
        if len(v) not in (1, c):
            raise UserError(f"--{name} needs 1 or {c} values (one per channel), got {len(v)}")
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    if (s <= 0).any():
        raise UserError("--std values must be positive")
    return (x - m) / s


def augment(x: torch.Tensor, pad: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop (zero padding ``pad``) and horizontal flip, per image, on a float batch."""
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator) + torch.arange(h)  # (n, h)
    dx = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator) + torch.arange(w)  # (n, w)
    flip = torch.rand(n, generator=generator) < 0.5
    dx[flip] = dx[flip].flip(1)
    batch = torch.arange(n).view(n, 1, 1, 1)
    chan = torch.arange(c).view(1, c, 1, 1)
    return padded[batch, chan, dy.view(n, 1, h, 1), dx.view(n, 1, 1, w)]  # (n, c, h, w)


# --------------------------------------------------------------------------- idx (MNIST family)

IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# Canonical mirrors and the checksums their authors publish ("algo:hex"; the
# MNIST-family and CIFAR archives are published with md5 sums, so those are
# what a download is checked against).
IDX_SOURCES = {
    "fashion-mnist": (
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        {
            "train-images-idx3-ubyte.gz": "md5:8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "md5:25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "md5:bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "md5:bb300cfdad3c16e7a12a480ee83cd310",
        },
    ),
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        {
            "train-images-idx3-ubyte.gz": "md5:f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "md5:d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "md5:9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "md5:ec29112dd5afa0611ce80d1b7f02629c",
        },
    ),
}
DEBIAN_DIRS = {"fashion-mnist": Path("/usr/share/datasets/fashion-mnist"), "mnist": Path("/usr/share/datasets/mnist")}


def load_idx(path: str | Path) -> np.ndarray:
    """Read an idx file (optionally gzip-compressed) into a numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise UserError(f"cannot read idx file {path} ({e}); delete it so it is fetched again") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise UserError(f"{path} is not an unsigned-byte idx file (bad magic); delete it so it is fetched again")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(dims)):
        raise UserError(f"{path} is truncated: header says {dims}, file holds {len(data) - offset} bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def download(url: str, dest: Path, checksum: str | None) -> Path:
    """Download ``url`` to ``dest`` atomically, verifying ``checksum`` ("sha256:..." or "md5:...")."""

    def fetch(tmp: str) -> None:
        try:
            with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
                shutil.copyfileobj(r, f)
        except (urllib.error.URLError, OSError) as e:
            raise UserError(
                f"could not download {url} ({e}); without network, put the file in {dest.parent} "
                "or pass --data-dir pointing at a folder that holds it"
            ) from e
        verify_checksum(tmp, checksum, url)  # a bad file never gets the final name

    atomic_write(dest, fetch)
    return dest


def verify_checksum(path: str | Path, expected: str | None, what: str = "") -> None:
    """Check ``path`` against ``expected`` given as ``"sha256:<hex>"`` or ``"md5:<hex>"`` (bare hex = sha256)."""
    if expected is None:
        return
    algo, _, digest = expected.rpartition(":")
    got = file_digest(path, algo or "sha256")
    if got != digest.lower():
        raise UserError(
            f"checksum mismatch for {what or path}: got {algo or 'sha256'} {got[:12]}..., "
            f"expected {digest[:12]}...; the file is corrupt or not the published one: delete it and fetch again"
        )


def _find_or_fetch(name: str, filename: str, data_dir: str | Path | None) -> Path:
    url, sums = IDX_SOURCES[name]
    candidates = []
    if data_dir is not None:
        candidates += [Path(data_dir) / filename, Path(data_dir) / name / filename]
    cache = default_cache_dir() / name
    candidates += [cache / filename, DEBIAN_DIRS[name] / filename]
    for c in candidates:
        if c.exists():
            return c
    return download(url + filename, cache / filename, sums[filename])


def load_mnist_family(name: str, split: str, data_dir: str | Path | None = None) -> Split:
    img_file, lbl_file = IDX_FILES[split]
    images = load_idx(_find_or_fetch(name, img_file, data_dir))
    labels = load_idx(_find_or_fetch(name, lbl_file, data_dir))
    if len(images) != len(labels):
        raise UserError(f"{name} {split}: {len(images)} images but {len(labels)} labels; files are mismatched")
    return Split(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))


# --------------------------------------------------------------------------- CIFAR (python pickle)

CIFAR_SOURCES = {
    "cifar10": (
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "md5:c58f30108f718f92721af3b95e74349a",
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        b"labels",
    ),
    "cifar100": (
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "md5:eb9058c3a382ffc7106e4002c42a8d85",
        "cifar-100-python",
        ["train"],
        ["test"],
        b"fine_labels",
    ),
}


def load_cifar(name: str, split: str, data_dir: str | Path | None = None, download_ok: bool = True) -> Split:
    """CIFAR-10/100 in the standard python-pickle layout (``cifar-10-batches-py/data_batch_1`` ...)."""
    url, sha, folder, train_files, test_files, label_key = CIFAR_SOURCES[name]
    roots = ([Path(data_dir)] if data_dir is not None else []) + [default_cache_dir()]
    root = next((r / folder for r in roots if (r / folder).is_dir()), None)
    if root is None:
        if not download_ok:
            raise UserError(f"{name} not found under {', '.join(map(str, roots))}; pass --data-dir with {folder}/")
        archive = download(url, default_cache_dir() / Path(url).name, sha)
        with tarfile.open(archive) as tar:
            tar.extractall(default_cache_dir(), filter="data")
        root = default_cache_dir() / folder
    images, labels = [], []
    for fname in train_files if split == "train" else test_files:
        try:
            with open(root / fname, "rb") as f:
                batch = pickle.load(f, encoding="bytes")
            data, lab = batch[b"data"], batch[label_key]
        except (OSError, pickle.UnpicklingError, EOFError, KeyError) as e:
            raise UserError(f"cannot read CIFAR batch {root / fname} ({e!r}); the file is missing or corrupt") from e
        images.append(np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(lab, dtype=np.int64))
    return Split(torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)))


# --------------------------------------------------------------------------- image folders


IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}  # channels of the model's first conv -> PIL mode


def _visible(p: Path) -> bool:
    # hidden folders and files (.git, .ipynb_checkpoints, ._x from macOS) and zip-tool debris are not data
    return not p.name.startswith(".") and p.name != "__MACOSX"


def _listdir(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if _visible(p))
    except OSError as e:
        raise UserError(f"cannot list folder {folder} ({e.strerror or e}); fix its permissions or remove it") from e


def _open_image(p: Path, mode: str, size: int | None) -> np.ndarray:
    """One image as uint8 (H, W[, C]): 16-bit images scaled by their full range (never clipped);
    decompression bombs (a small file claiming a huge image) refused."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p) as im:
                if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
                    a16 = np.asarray(im)
                    if a16.min() < 0 or a16.max() > 65535:
                        raise UserError(f"image {p} holds values outside 0..65535; convert it to 8 or 16 bit")
                    # 0..65535 -> 0..255 by the type's range: scaled, not clipped at 255
                    im = Image.fromarray(np.round(a16.astype(np.float64) / 257.0).astype(np.uint8), "L")
                elif im.mode == "F":
                    raise UserError(f"image {p} is a floating-point image; save it as 8 or 16 bit")
                im = im.convert(mode)
                if size is not None and im.size != (size, size):
                    im = im.resize((size, size), Image.BILINEAR)
                return np.asarray(im, dtype=np.uint8)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UserError(f"image {p} claims a huge size ({e}); remove it (decompression bomb?)") from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        if isinstance(e, UserError):
            raise
        raise UserError(f"cannot read image {p} ({e}); remove or replace it") from e


def load_image_folder(
    root: str | Path, size: int | None = None, channels: int = 3, classes: list[str] | None = None
) -> tuple[Split, list[str]]:
    """One sub-folder per class (sorted names = class indices), or a flat folder of unlabelled images
    (labels are then -1). Images are converted to ``channels`` (1, 2, 3 or 4) and resized to ``size``.

    ``classes``: the class list of the model (e.g. of the compression images): sub-folders are
    labelled by their *name*'s index in it, and a sub-folder not in it is an error. Hidden entries
    (``.*``, ``__MACOSX``) are ignored.
    """
    root = Path(root)
    if not root.is_dir():
        what = "is a file" if root.exists() else "does not exist"
        raise UserError(f"image folder {root} {what}; pass a folder with one sub-folder per class")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise UserError(f"--size must be a whole number >= 1, got {size!r}")
    if channels not in _MODES:
        raise UserError(f"the model's first conv takes {channels} channels; image folders give 1, 2, 3 or 4")
    found = [d.name for d in _listdir(root) if d.is_dir()]
    index = {c: i for i, c in enumerate(classes if classes is not None else found)}
    unknown = [c for c in found if c not in index]
    if unknown:
        raise UserError(
            f"class folder {unknown[0]!r} in {root} is not a class of the model ({', '.join(list(index)[:5])}...); "
            "remove it or use the same class folder names"
        )
    entries: list[tuple[Path, int]] = []
    if found:
        for c in found:
            entries += [(p, index[c]) for p in _listdir(root / c) if p.suffix.lower() in IMAGE_EXTS]
    else:
        entries = [(p, -1) for p in _listdir(root) if p.suffix.lower() in IMAGE_EXTS]
    if not entries:
        raise UserError(f"no images ({', '.join(sorted(IMAGE_EXTS))}) found in {root}")
    arrays, labels = [], []
    for p, label in entries:
        a = _open_image(p, _MODES[channels], size)
        arrays.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
        labels.append(label)
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise UserError(f"images in {root} have different sizes {sorted(shapes)[:3]}; pass size= to resize them")
    return Split(torch.from_numpy(np.stack(arrays)), torch.tensor(labels, dtype=torch.int64)), list(index)


# --------------------------------------------------------------------------- entry points


def load_dataset(name: str, split: str = "train", data_dir: str | Path | None = None) -> Split:
    """Load ``split`` ("train" or "test") of a named data set as uint8 images and labels."""
    if split not in ("train", "test"):
        raise UserError(f"split must be 'train' or 'test', got {split!r}")
    info = dataset_info(name)
    if info.name in IDX_SOURCES:
        return load_mnist_family(info.name, split, data_dir)
    return load_cifar(info.name, split, data_dir)


def few_shot(split: Split, k: int, seed: int = 0, num_classes: int | None = None) -> Split:
    """K images per class, stratified, drawn without replacement with ``seed``.

    Deterministic: the same (split, k, seed) always gives the same images, in
    class order, so every method sees the same draw.
    """
    sel = few_shot_indices(split, k, seed, num_classes)
    return Split(split.images[sel], split.labels[sel])


def few_shot_indices(
    split: Split, k: int, seed: int = 0, num_classes: int | None = None, exclude: torch.Tensor | None = None
) -> torch.Tensor:
    """Indices into ``split`` of :func:`few_shot`'s draw (class order); ``exclude``: indices never drawn."""
    if k < 1:
        raise UserError(f"k must be at least 1 image per class, got {k}")
    labels = split.labels
    classes = range(num_classes) if num_classes is not None else torch.unique(labels[labels >= 0]).tolist()
    if len(classes) == 0:
        raise UserError("no labelled images to draw a few-shot set from; give one sub-folder per class")
    allowed = torch.ones(len(labels), dtype=torch.bool)
    if exclude is not None:
        allowed[exclude] = False
    g = torch.Generator().manual_seed(seed)
    picks = []
    for c in classes:
        idx = torch.nonzero((labels == c) & allowed).flatten()
        if len(idx) < k:
            raise UserError(f"class {c} has only {len(idx)} images but k={k} were asked; lower --k")
        picks.append(idx[torch.randperm(len(idx), generator=g)[:k]])
    return torch.cat(picks)


def load_validation(
    dataset: str,
    n_per_class: int,
    seed: int = 0,
    exclude: torch.Tensor | None = None,
    data_dir: str | Path | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A validation set for choosing hyperparameters: ``n_per_class`` normalised images per class from
    the TRAIN split (never the test split), none of them in ``exclude`` (train-split indices, e.g.
    ``few_shot_indices(train, k, seed)``: the few-shot draw). Returns (images, labels)."""
    info = dataset_info(dataset)
    train = load_dataset(info.name, "train", data_dir)
    # a seed of its own: the same validation images for every few-shot draw that does not touch them
    sel = few_shot_indices(train, n_per_class, 10_000 + seed, info.num_classes, exclude)
    return normalize(train.images[sel], info), train.labels[sel]


def load_few_shot(
    dataset: str, k: int, seed: int = 0, data_dir: str | Path | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised float images (K per class, train split) and their labels: the compression input."""
    info = dataset_info(dataset)
    draw = few_shot(load_dataset(info.name, "train", data_dir), k, seed, info.num_classes)
    return normalize(draw.images, info), draw.labels
