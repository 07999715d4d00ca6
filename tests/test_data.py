from __future__ import annotations

import gzip
import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from crossdistill.data import (
    Split,
    augment,
    dataset_info,
    download,
    few_shot,
    load_cifar,
    load_dataset,
    load_idx,
    load_image_folder,
    normalize,
    verify_checksum,
)
from crossdistill.errors import UserError

# --------------------------------------------------------------------------- idx


def idx_bytes(a: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, a.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in a.shape)
    return header + a.astype(np.uint8).tobytes()


@pytest.mark.parametrize("compressed", [False, True])
def test_load_idx_round_trip(tmp_path: Path, compressed: bool) -> None:
    a = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    path = tmp_path / ("x.idx.gz" if compressed else "x.idx")
    path.write_bytes(gzip.compress(idx_bytes(a)) if compressed else idx_bytes(a))
    np.testing.assert_array_equal(load_idx(path), a)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    (tmp_path / "l.idx").write_bytes(idx_bytes(labels))
    np.testing.assert_array_equal(load_idx(tmp_path / "l.idx"), labels)


def test_load_idx_bad_magic(tmp_path: Path) -> None:
    data = bytearray(idx_bytes(np.zeros((2, 2), np.uint8)))
    data[2] = 0x0D  # float32 type code, not unsigned byte
    (tmp_path / "bad.idx").write_bytes(bytes(data))
    with pytest.raises(UserError, match="magic"):
        load_idx(tmp_path / "bad.idx")


@pytest.mark.parametrize("compressed", [False, True])
def test_load_idx_truncated(tmp_path: Path, compressed: bool) -> None:
    data = idx_bytes(np.ones((4, 3, 3), np.uint8))[:-5]
    path = tmp_path / ("t.idx.gz" if compressed else "t.idx")
    path.write_bytes(gzip.compress(data) if compressed else data)
    with pytest.raises(UserError, match="truncated"):
        load_idx(path)


def test_load_idx_broken_gzip(tmp_path: Path) -> None:
    (tmp_path / "b.gz").write_bytes(gzip.compress(idx_bytes(np.ones((50, 50), np.uint8)))[:20])
    with pytest.raises(UserError):
        load_idx(tmp_path / "b.gz")


def test_mnist_family_from_data_dir(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (6, 28, 28), dtype=np.uint8)
    labels = np.array([0, 1, 2, 0, 1, 2], np.uint8)
    for name, a in [("t10k-images-idx3-ubyte.gz", images), ("t10k-labels-idx1-ubyte.gz", labels)]:
        (tmp_path / name).write_bytes(gzip.compress(idx_bytes(a)))
    split = load_dataset("mnist", "test", data_dir=tmp_path)
    assert split.images.shape == (6, 1, 28, 28) and split.images.dtype == torch.uint8
    assert split.labels.dtype == torch.int64 and split.labels.tolist() == labels.tolist()
    np.testing.assert_array_equal(split.images[:, 0].numpy(), images)


# --------------------------------------------------------------------------- CIFAR


def write_cifar(root: Path, name: str, n: int = 4) -> dict[str, tuple[np.ndarray, list[int]]]:
    rng = np.random.default_rng(1)
    if name == "cifar10":
        folder, key, classes = root / "cifar-10-batches-py", "labels", 10
        files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    else:
        folder, files, key, classes = root / "cifar-100-python", ["train", "test"], "fine_labels", 100
    folder.mkdir(parents=True)
    written = {}
    for f in files:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, classes, n).tolist()
        with open(folder / f, "wb") as fh:
            pickle.dump({b"data": data, key.encode(): labels, b"batch_label": f.encode()}, fh)
        written[f] = (data, labels)
    return written


def test_cifar10_layout(tmp_path: Path) -> None:
    written = write_cifar(tmp_path, "cifar10")
    train = load_cifar("cifar10", "train", tmp_path, download_ok=False)
    test = load_cifar("cifar10", "test", tmp_path, download_ok=False)
    assert train.images.shape == (20, 3, 32, 32) and test.images.shape == (4, 3, 32, 32)
    assert train.labels.tolist() == sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    data, labels = written["test_batch"]
    assert test.labels.tolist() == labels
    # rows are R plane, G plane, B plane, each row-major 32x32
    np.testing.assert_array_equal(test.images[2, 1].numpy(), data[2, 1024:2048].reshape(32, 32))


def test_cifar100_layout(tmp_path: Path) -> None:
    written = write_cifar(tmp_path, "cifar100", n=5)
    train = load_cifar("cifar100", "train", tmp_path, download_ok=False)
    test = load_cifar("cifar100", "test", tmp_path, download_ok=False)
    assert train.images.shape == (5, 3, 32, 32) and train.images.dtype == torch.uint8
    assert train.labels.tolist() == written["train"][1] and test.labels.tolist() == written["test"][1]


def test_cifar_missing_without_download(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        load_cifar("cifar10", "test", tmp_path, download_ok=False)


def test_cifar_corrupt_batch(tmp_path: Path) -> None:
    write_cifar(tmp_path, "cifar100")
    (tmp_path / "cifar-100-python" / "test").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="corrupt"):
        load_cifar("cifar100", "test", tmp_path, download_ok=False)


# --------------------------------------------------------------------------- checksums and download


def test_verify_checksum(tmp_path: Path) -> None:
    f = tmp_path / "f.bin"
    f.write_bytes(b"hello few-shot world")
    sha, md5 = hashlib.sha256(f.read_bytes()).hexdigest(), hashlib.md5(f.read_bytes()).hexdigest()
    verify_checksum(f, f"sha256:{sha}")
    verify_checksum(f, f"md5:{md5}")
    verify_checksum(f, sha)  # bare hex is sha256
    verify_checksum(f, f"sha256:{sha.upper()}")
    verify_checksum(f, None)
    with pytest.raises(UserError, match="checksum mismatch"):
        verify_checksum(f, f"sha256:{'0' * 64}")
    with pytest.raises(UserError, match="checksum mismatch"):
        verify_checksum(f, f"md5:{'0' * 32}")
    with pytest.raises(UserError):
        verify_checksum(f, f"md5:{sha}")  # right digest, wrong algorithm


def test_download_file_url(tmp_path: Path) -> None:
    src = tmp_path / "src" / "blob.bin"
    src.parent.mkdir()
    src.write_bytes(bytes(range(256)) * 40)
    dest = tmp_path / "out" / "blob.bin"
    md5 = hashlib.md5(src.read_bytes()).hexdigest()
    assert download(src.as_uri(), dest, f"md5:{md5}") == dest
    assert dest.read_bytes() == src.read_bytes()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["blob.bin"]  # no .part left


def test_download_wrong_checksum_leaves_nothing(tmp_path: Path) -> None:
    src = tmp_path / "blob.bin"
    src.write_bytes(b"payload")
    dest = tmp_path / "out" / "blob.bin"
    with pytest.raises(UserError, match="checksum mismatch"):
        download(src.as_uri(), dest, "sha256:" + "ab" * 32)
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == []


def test_download_missing_source(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="could not download"):
        download((tmp_path / "nope.bin").as_uri(), tmp_path / "out" / "nope.bin", None)
    assert list((tmp_path / "out").iterdir()) == []


# --------------------------------------------------------------------------- image folders


def write_png(path: Path, value: int, size: tuple[int, int] = (8, 8), mode: str = "RGB") -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    color = (value, 255 - value, 7) if mode == "RGB" else value
    Image.new(mode, size, color).save(path)


def test_image_folder_with_classes(tmp_path: Path) -> None:
    write_png(tmp_path / "cat" / "a.png", 10)
    write_png(tmp_path / "cat" / "b.png", 20, mode="L")
    write_png(tmp_path / "dog" / "c.png", 30)
    (tmp_path / "dog" / "notes.txt").write_text("ignored")
    split, classes = load_image_folder(tmp_path, channels=3)
    assert classes == ["cat", "dog"]
    assert split.labels.tolist() == [0, 0, 1]
    assert split.images.shape == (3, 3, 8, 8) and split.images.dtype == torch.uint8
    assert split.images[0, :, 0, 0].tolist() == [10, 245, 7]
    gray, _ = load_image_folder(tmp_path, size=28, channels=1)
    assert gray.images.shape == (3, 1, 28, 28)


def test_image_folder_flat_is_unlabelled(tmp_path: Path) -> None:
    write_png(tmp_path / "x.png", 1, size=(5, 5))
    write_png(tmp_path / "y.PNG", 2, size=(9, 7))
    with pytest.raises(UserError, match="different sizes"):
        load_image_folder(tmp_path, channels=1)
    split, classes = load_image_folder(tmp_path, size=6, channels=1)
    assert classes == [] and split.labels.tolist() == [-1, -1]
    assert split.images.shape == (2, 1, 6, 6)


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_image_folder(tmp_path / "missing")
    with pytest.raises(UserError, match="no images"):
        load_image_folder(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="cannot read image"):
        load_image_folder(tmp_path)


# --------------------------------------------------------------------------- few-shot sampling


def indexed_split(labels: list[int]) -> Split:
    """Images whose first pixel is their own index, to check images travel with their labels."""
    n = len(labels)
    images = torch.zeros(n, 1, 2, 2, dtype=torch.int64)
    images[:, 0, 0, 0] = torch.arange(n)
    return Split(images, torch.tensor(labels, dtype=torch.int64))


def test_few_shot_k_per_class_and_deterministic() -> None:
    split = indexed_split([i % 10 for i in range(1000)])
    a, b, c = few_shot(split, 5, seed=0), few_shot(split, 5, seed=0), few_shot(split, 5, seed=1)
    assert len(a) == 50
    assert torch.bincount(a.labels, minlength=10).tolist() == [5] * 10
    assert a.labels.tolist() == sorted(a.labels.tolist())  # class order
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)


def test_few_shot_not_enough_images() -> None:
    split = indexed_split([0] * 10 + [1] * 3 + [2] * 10)
    with pytest.raises(UserError, match="class 1 has only 3 images but k=5"):
        few_shot(split, 5)
    with pytest.raises(UserError, match="class 3 has only 0"):
        few_shot(split, 1, num_classes=4)
    with pytest.raises(UserError, match="at least 1"):
        few_shot(split, 0)


@settings(max_examples=60, deadline=None)
@given(
    labels=st.lists(st.integers(min_value=-1, max_value=5), min_size=1, max_size=80),
    k=st.integers(min_value=1, max_value=6),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
)
def test_few_shot_stratified_property(labels: list[int], k: int, seed: int) -> None:
    counts = {c: labels.count(c) for c in set(labels) if c >= 0}
    split = indexed_split(labels)
    if not counts:
        with pytest.raises(UserError, match="no labelled images"):
            few_shot(split, k, seed)
        return
    if min(counts.values()) < k:
        with pytest.raises(UserError):
            few_shot(split, k, seed)
        return
    out = few_shot(split, k, seed)
    assert len(out) == k * len(counts)
    assert {c: out.labels.tolist().count(c) for c in counts} == {c: k for c in counts}
    idx = out.images[:, 0, 0, 0]
    assert len(set(idx.tolist())) == len(idx)  # without replacement
    assert torch.equal(split.labels[idx], out.labels)  # images keep their labels


# --------------------------------------------------------------------------- transforms


def test_augment_shape_dtype_determinism() -> None:
    x = torch.randn(6, 3, 32, 32)
    a = augment(x, 4, torch.Generator().manual_seed(3))
    b = augment(x, 4, torch.Generator().manual_seed(3))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b)
    assert not torch.equal(a, augment(x, 4, torch.Generator().manual_seed(4)))


def test_augment_without_padding_only_flips() -> None:
    x = torch.randn(16, 1, 28, 28)
    out = augment(x, 0, torch.Generator().manual_seed(0))
    for i in range(len(x)):
        assert torch.equal(out[i], x[i]) or torch.equal(out[i], x[i].flip(-1))


def test_augment_crop_is_a_shift() -> None:
    x = torch.arange(1 * 1 * 6 * 6, dtype=torch.float32).view(1, 1, 6, 6) + 1
    out = augment(x, 2, torch.Generator().manual_seed(5))
    nonzero = out[out != 0]
    assert set(nonzero.tolist()) <= set(x.flatten().tolist())  # pixels moved or zero padding, nothing invented


def test_normalize_fashion_mnist_test_set(fashion_dir: Path) -> None:
    info = dataset_info("fashion-mnist")
    split = load_dataset("fashion-mnist", "test", data_dir=fashion_dir)
    assert split.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(split.labels).tolist() == [1000] * 10
    x = normalize(split.images, info)
    assert x.dtype == torch.float32
    assert abs(x.mean().item()) < 0.02 and abs(x.std().item() - 1) < 0.02


def test_dataset_info_aliases_and_unknown() -> None:
    assert dataset_info("FashionMNIST").name == "fashion-mnist"
    assert dataset_info("cifar-100").num_classes == 100
    with pytest.raises(UserError, match="unknown dataset"):
        dataset_info("imagenet")
