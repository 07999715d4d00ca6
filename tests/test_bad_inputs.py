"""Bad inputs, through the CLI and the library: each is refused with exit 2 and one line on stderr
(no traceback), runs no code from a data file, and leaves every file the user had byte-identical.

Most cases run the CLI in-process (``cli.main(argv)``, output captured); only the kill -9 / SIGTERM
cases start real subprocesses, which stop at a named point through ``CROSSDISTILL_KILL_AT``.
Fixtures are module-scoped: one tiny user model, one tiny registry checkpoint, one tiny data set.
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from crossdistill import cli
from crossdistill.checkpoint import load_checkpoint, save_checkpoint
from crossdistill.compress import compress
from crossdistill.errors import UserError
from crossdistill.evaluate import evaluate
from crossdistill.models import get_model
from crossdistill.outdir import clean_stale, write_folder
from crossdistill.student import save_student
from crossdistill.usermodel import images_from_folder

REPO = Path(__file__).resolve().parent.parent
TEACHER = REPO / "teachers" / "resnet20_fashion-mnist.safetensors"

# a model file that, if it were ever imported, would leave a file behind: proof that code ran
PAYLOAD_PY = """
from pathlib import Path
Path({marker!r}).write_text("code ran")
import torch
def build():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2))
"""

TINY_PY = """
import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self, channels=3, classes=2):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        )
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


class Pair(Tiny):
    def forward(self, x):
        return super().forward(x), x


def build():
    return Tiny()


def four():
    return Tiny(channels=4)


def two():
    return Tiny(channels=2)


def pair():
    return Pair()


def integer():
    m = Tiny()
    m.features[3].weight = nn.Parameter(m.features[3].weight.data.round().to(torch.int32), requires_grad=False)
    return m


def always_dog():  # a model that is right on every 'dog' image: must never be scored 0 % on dogs
    m = Tiny()
    with torch.no_grad():
        m.fc.weight.zero_()
        m.fc.bias.copy_(torch.tensor([0.0, 10.0]))
    return m


def not_a_module():
    return 42


def broken():
    raise RuntimeError("boom")


def untraceable():
    class Branchy(Tiny):
        def forward(self, x):
            y = super().forward(x)
            return y if float(y.sum()) > -1e9 else -y  # data-dependent Python branch: torch.export fails
    return Branchy()
"""


class Payload:
    """A pickle that creates a file when unpickled (what a planted .pt would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


# --------------------------------------------------------------------------- fixtures


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _bomb_png(path: Path) -> None:
    """A valid PNG header claiming 100000 x 100000 pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")))


@pytest.fixture(scope="module")
def user(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The user's files: a model file, weights, image folders, keep files, a tiny data set, checkpoints."""
    root = tmp_path_factory.mktemp("user")
    f: dict[str, Path] = {"root": root}
    rng = np.random.default_rng(0)
    (root / "tiny.py").write_text(TINY_PY)
    f["model"] = root / "tiny.py"
    f["marker"] = root / "CODE_RAN"
    (root / "payload.py").write_text(PAYLOAD_PY.format(marker=str(f["marker"])))
    sys.path.insert(0, str(root))
    torch.manual_seed(0)
    from crossdistill.usermodel import load_model_file

    model = load_model_file(f"{root / 'tiny.py'}:build")
    torch.save(model.state_dict(), root / "w.pt")
    f["weights"] = root / "w.pt"
    bad = model.state_dict()
    bad["features.1.running_var"][0] = float("nan")
    torch.save(bad, root / "nan_w.pt")
    torch.save({"fc.weight": torch.zeros(3, 3)}, root / "wrong_w.pt")
    (root / "corrupt_w.pt").write_bytes(b"not a pickle at all")
    with open(root / "planted_w.pt", "wb") as fh:
        pickle.dump({"state_dict": Payload(f["marker"])}, fh)
    for c in ("cat", "dog"):
        for i in range(3):
            _png(root / "images" / c / f"{i}.png", rng.integers(0, 256, (12, 12, 3), dtype=np.uint8))
    _png(root / "test" / "dog" / "0.png", rng.integers(0, 256, (12, 12, 3), dtype=np.uint8))
    _png(root / "test_unknown" / "horse" / "0.png", rng.integers(0, 256, (12, 12, 3), dtype=np.uint8))
    for c in ("a", "b", "c"):
        _png(root / "test3" / c / "0.png", rng.integers(0, 256, (12, 12, 3), dtype=np.uint8))
    for i in range(3):
        _png(root / "flat" / f"{i}.png", rng.integers(0, 256, (12, 12, 3), dtype=np.uint8))
    _png(root / "mixed" / "a" / "0.png", rng.integers(0, 256, (12, 12, 3), dtype=np.uint8))
    _png(root / "mixed" / "a" / "1.png", rng.integers(0, 256, (9, 9, 3), dtype=np.uint8))
    (root / "corrupt_img" / "a").mkdir(parents=True)
    (root / "corrupt_img" / "a" / "x.png").write_bytes(b"\x89PNG broken")
    (root / "bomb" / "a").mkdir(parents=True)
    _bomb_png(root / "bomb" / "a" / "x.png")
    (root / "empty").mkdir()
    (root / "keep_ok.yaml").write_text("'features.3': 0.5\n")
    (root / "keep_nomatch.yaml").write_text("'layer9.*': 0.5\n")
    (root / "keep_bad.yaml").write_text("a: [unclosed\n")
    (root / "keep_list.yaml").write_text("- 0.5\n")
    (root / "keep_ratio.yaml").write_text("'features.3': 2\n")
    (root / "a_file.txt").write_text("the user's notes\n")
    (root / "full").mkdir()
    (root / "full" / "mine.txt").write_text("keep me\n")
    # a tiny Fashion-MNIST-format data set (idx files) for registry checkpoints and train-teacher
    data = root / "data"
    data.mkdir()
    for split, n in (("train", 64), ("t10k", 20)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 256, (n, 28, 28))
        images[:, :4, :4] = (labels * 25)[:, None, None]  # a learnable signal in one corner
        _idx(data / f"{split}-images-idx3-ubyte.gz", images)
        _idx(data / f"{split}-labels-idx1-ubyte.gz", labels)
    f["data"] = data
    lenet = get_model("lenet5", 10, 1)
    meta = {"model": "lenet5", "dataset": "fashion-mnist", "num_classes": 10, "in_channels": 1}
    save_checkpoint(lenet, root / "ckpt" / "lenet.safetensors", meta)
    f["ckpt"] = root / "ckpt" / "lenet.safetensors"
    nan = get_model("lenet5", 10, 1)
    with torch.no_grad():
        nan.features[0].weight[0, 0, 0, 0] = float("nan")
    save_checkpoint(nan, root / "ckpt" / "nan.safetensors", meta)
    inf_bn = get_model("resnet20", 10, 1)
    inf_bn.bn1.running_mean[0] = float("inf")
    save_checkpoint(inf_bn, root / "ckpt" / "infbn.safetensors", {**meta, "model": "resnet20"})
    # a checkpoint whose sidecar names the payload model file
    trojan = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
    save_checkpoint(trojan, root / "ckpt" / "trojan.safetensors",
                    {"model_file": f"{root / 'payload.py'}:build", "in_channels": 3})  # fmt: skip
    (root / "ckpt" / "corrupt.safetensors").write_bytes(b"garbage")
    (root / "ckpt" / "corrupt.json").write_text(json.dumps(meta))
    (root / "ckpt" / "noside.safetensors").write_bytes((root / "ckpt" / "lenet.safetensors").read_bytes())
    (root / "ckpt" / "badjson.safetensors").write_bytes((root / "ckpt" / "lenet.safetensors").read_bytes())
    (root / "ckpt" / "badjson.json").write_text("{not json")
    return f


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    capsys.readouterr()
    code = cli.main(argv)
    return code, capsys.readouterr().err


def assert_refused(code: int, err: str, expect: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err and lines[0].startswith("error: ")
    assert expect.lower() in lines[0].lower(), lines[0]


# --------------------------------------------------------------------------- the CLI, in-process

M = "{root}/tiny.py:build"
IMG = "{root}/images"
CK = "{root}/ckpt/lenet.safetensors"
T = ["--data-dir", "{root}/data", "--no-latency", "--test-limit", "5"]
MF = ["compress", "--model-file", M, "--images", IMG, "--no-latency"]

CASES = [
    # which input, how the model is named
    (["compress"], "either --teacher"),
    (["compress", "--teacher", CK, "--model-file", M], "either --teacher"),
    (["compress", "--teacher", "{root}/nothing.safetensors"], "does not exist"),
    (["compress", "--teacher", "{root}/ckpt"], "is a folder"),
    (["compress", "--teacher", "{root}/ckpt/corrupt.safetensors"], "corrupt"),
    (["compress", "--teacher", "{root}/ckpt/noside.safetensors"], "no metadata"),
    (["compress", "--teacher", "{root}/ckpt/badjson.safetensors"], "not valid json"),
    (["compress", "--teacher", "{root}/ckpt/nan.safetensors", *T], "nan or inf in features.0.weight"),
    (["compress", "--teacher", "{root}/ckpt/infbn.safetensors", *T], "nan or inf in bn1.running_mean"),
    (["compress", "--teacher", "{root}/ckpt/trojan.safetensors", *T], "--model-file"),
    (["compress", "--teacher", CK, "--images", IMG, *T], "--images goes with --model-file"),
    (["compress", "--teacher", CK, "--dataset", "imagenet", *T], "unknown dataset"),
    # numbers
    (["compress", "--teacher", CK, "--k", "0", *T], "--k must"),
    (["compress", "--teacher", CK, "--k", "100000", *T], "lower --k"),
    (["compress", "--teacher", CK, "--keep", "0", *T], "--keep must"),
    (["compress", "--teacher", CK, "--keep", "1.5", *T], "--keep must"),
    (["compress", "--teacher", CK, "--keep", "nan", *T], "--keep must"),
    (["compress", "--teacher", CK, "--mu", "2", *T], "--mu must"),
    (["compress", "--teacher", CK, "--alpha", "-1", *T], "--alpha must"),
    (["compress", "--teacher", CK, "--method", "magic", *T], "unknown --method"),
    (["compress", "--teacher", CK, "--solver", "magic", *T], "unknown --solver"),
    (["compress", "--teacher", CK, "--prune", "magic", *T], "--prune must"),
    (["compress", "--teacher", CK, "--solver", "adam", "--iterations", "0", *T], "--iterations must"),
    (["compress", "--teacher", CK, "--iterations", "-5", *T], "--iterations must"),
    (["compress", "--teacher", CK, "--lr", "0", *T], "--lr must"),
    (["compress", "--teacher", CK, "--lr", "nan", *T], "--lr must"),
    (["compress", "--teacher", CK, "--lr", "inf", *T], "--lr must"),
    (["compress", "--teacher", CK, "--test-limit", "0", "--data-dir", "{root}/data"], "--test-limit must"),
    (["compress", "--teacher", CK, "--device", "tpu", *T], "--device cpu"),
    (["compress", "--teacher", CK, "--device", "cuda:x", *T], "--device cpu"),
    (["compress", "--teacher", CK, "--k", "abc"], "--k"),
    (["compress", "--teacher", CK, "--size", "abc"], "--size"),
    (["compress", "--teacher", CK, "--no-such-option"], "no such option"),
    (["compress", "--teacher", CK, "--keep"], "requires an argument"),
    (["frobnicate"], "no such command"),
    # layer patterns and keep files
    (["compress", "--teacher", CK, "--include", "nothing*", *T], "--include pattern"),
    (["compress", "--teacher", CK, "--exclude", "nothing*", *T], "--exclude pattern"),
    (["compress", "--teacher", CK, "--keep-file", "{root}/nothing.yaml", *T], "does not exist"),
    (["compress", "--teacher", CK, "--keep-file", "{root}/ckpt", *T], "is a folder"),
    (["compress", "--teacher", CK, "--keep-file", "{root}/keep_bad.yaml", *T], "not valid yaml"),
    (["compress", "--teacher", CK, "--keep-file", "{root}/keep_list.yaml", *T], "must map"),
    (["compress", "--teacher", CK, "--keep-file", "{root}/keep_ratio.yaml", *T], "(0, 1]"),
    (["compress", "--teacher", CK, "--keep-file", "{root}/keep_nomatch.yaml", *T], "--keep-file pattern"),
    # output paths
    (["compress", "--teacher", CK, "--out", "{root}/a_file.txt", *T], "a folder is needed"),
    (["compress", "--teacher", CK, "--out", "{root}/full", *T], "--overwrite"),
    (["compress", "--teacher", CK, "--out", "{root}/a_file.txt/sub", *T], "is a file, not a folder"),
    (["compress", "--teacher", CK, "--out", "/proc/crossdistill", *T], "system folder"),
    (["compress", "--teacher", CK, "--out", str(REPO / "teachers"), *T], "shipped teachers"),
    (["compress", "--teacher", CK, "--out", ".", "--overwrite", *T], "current folder"),
    (["compress", "--teacher", CK, "--out", "/", "--overwrite", *T], "current folder"),
    (["demo", "--out", "{root}/full"], "--overwrite"),
    (["demo", "--out", "{root}/a_file.txt"], "a folder is needed"),
    # the user's model file
    (["compress", "--model-file", M], "needs --images"),
    (["compress", "--model-file", "{root}/tiny.py", "--images", IMG], "path/to/file.py:function"),
    (["compress", "--model-file", "{root}/nothing.py:build", "--images", IMG], "does not exist"),
    (["compress", "--model-file", "{root}/tiny.py:nothing", "--images", IMG], "no function"),
    (["compress", "--model-file", "{root}/tiny.py:broken", "--images", IMG], "boom"),
    (["compress", "--model-file", "{root}/tiny.py:not_a_module", "--images", IMG], "not a torch.nn.module"),
    (["compress", "--model-file", "{root}/tiny.py:pair", "--images", IMG], "returns a tuple"),
    (["compress", "--model-file", "{root}/tiny.py:integer", "--images", IMG], "int32 weights"),
    ([*MF, "--weights", "{root}/nothing.pt"], "does not exist"),
    ([*MF, "--weights", "{root}/images"], "is a folder"),
    ([*MF, "--weights", "{root}/corrupt_w.pt"], "cannot read weights"),
    ([*MF, "--weights", "{root}/planted_w.pt"], "cannot read weights"),
    ([*MF, "--weights", "{root}/wrong_w.pt"], "do not fit"),
    ([*MF, "--weights", "{root}/nan_w.pt"], "nan or inf in features.1.running_var"),
    # the user's images
    (["compress", "--model-file", M, "--images", "{root}/nothing"], "does not exist"),
    (["compress", "--model-file", M, "--images", "{root}/a_file.txt"], "is a file"),
    (["compress", "--model-file", M, "--images", "{root}/empty"], "no images"),
    (["compress", "--model-file", M, "--images", "{root}/corrupt_img"], "cannot read image"),
    (["compress", "--model-file", M, "--images", "{root}/bomb"], "decompression bomb"),
    (["compress", "--model-file", M, "--images", "{root}/mixed"], "pass --size to resize"),
    ([*MF, "--size", "0"], "--size must"),
    ([*MF, "--size", "-3"], "--size must"),
    ([*MF, "--mean", "a,b"], "comma-separated"),
    ([*MF, "--mean", "0.5,0.5"], "--mean needs 1 or 3"),
    ([*MF, "--std", "0"], "--std values must be positive"),
    ([*MF, "--test-images", "{root}/nothing"], "does not exist"),
    ([*MF, "--test-images", "{root}/test_unknown"], "not a class of the model"),
    (["compress", "--model-file", M, "--images", "{root}/flat", "--test-images", "{root}/test3"], "3 classes"),
    # evaluate
    (["evaluate", "{root}/nothing.safetensors"], "does not exist"),
    (["evaluate", "{root}/ckpt"], "is a folder"),
    (["evaluate", "{root}/ckpt/nan.safetensors", "--no-latency"], "nan or inf"),
    (["evaluate", "{root}/ckpt/infbn.safetensors", "--no-latency"], "bn1.running_mean"),
    (["evaluate", "{root}/ckpt/trojan.safetensors", "--no-latency"], "--trust-model-file"),
    (["evaluate", "{root}/ckpt/corrupt.safetensors"], "corrupt"),
    (["evaluate", CK, "--limit", "0"], "--limit must"),
    (["evaluate", CK, "--json", "{root}/full", "--no-latency"], "a file is needed"),
    (["evaluate", CK, "--dataset", "imagenet", "--no-latency"], "unknown dataset"),
    # train-teacher
    (["train-teacher", "--epochs", "0"], "--epochs must"),
    (["train-teacher", "--lr", "-1"], "--lr must"),
    (["train-teacher", "--batch-size", "0"], "--batch-size must"),
    (["train-teacher", "--model", "nope", "--out", "{root}/t.safetensors"], "nope"),
    (["train-teacher", "--dataset", "nope", "--out", "{root}/t.safetensors"], "unknown dataset"),
    (["train-teacher", "--out", "{root}/a_file.txt"], "already exists"),
    (["train-teacher", "--out", "{root}/full"], "a file is needed"),
    (["train-teacher", "--out", str(TEACHER)], "shipped teacher"),
    (["train-teacher", "--out", "/proc/t.safetensors"], "system folder"),
    (
        ["train-teacher", "--batch-size", "1000", "--data-dir", "{root}/data", "--out", "{root}/t.safetensors"],
        "larger than the training set",
    ),
]


@pytest.mark.parametrize(
    ("argv", "expect"), CASES, ids=[f"{i:02d}-{' '.join(a[:3])}" for i, (a, _) in enumerate(CASES)]
)
def test_cli_refuses_with_one_line_and_touches_nothing(argv, expect, user, capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # where default outputs (runs/...) would land
    argv = [a.format(root=user["root"]) for a in argv]
    before, teachers = _snapshot(user["root"]), _snapshot(REPO / "teachers")
    code, err = run_cli(argv, capsys)
    assert_refused(code, err, expect)
    assert _snapshot(user["root"]) == before, "a user file changed"
    assert _snapshot(REPO / "teachers") == teachers
    assert not user["marker"].exists(), "code from a data file ran"
    assert list(tmp_path.iterdir()) == [], "a refused command wrote output"


def test_unreadable_class_folder_is_one_line(user, capsys, monkeypatch, tmp_path) -> None:
    for c in ("a", "b"):
        _png(tmp_path / "imgs" / c / "0.png", np.zeros((12, 12, 3), np.uint8))
    real = Path.iterdir

    def iterdir(self):  # tests run as root, where chmod 000 does not stop reading
        if self.name == "b":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    code, err = run_cli(["compress", "--model-file", f"{user['model']}:build", "--images", str(tmp_path / "imgs"),
                         "--out", str(tmp_path / "out")], capsys)  # fmt: skip
    assert_refused(code, err, "cannot list folder")
    assert not (tmp_path / "out").exists()


def test_internal_error_says_so_and_writes_the_traceback(user, capsys, monkeypatch, tmp_path) -> None:
    ev = sys.modules["crossdistill.evaluate"]  # the package exports a function of the same name

    def bug(*a, **k):
        raise ZeroDivisionError("a bug of ours")

    monkeypatch.setattr(ev, "evaluate_checkpoint", bug)
    code, err = run_cli(["evaluate", str(user["ckpt"])], capsys)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("internal error (ZeroDivisionError")
    where = Path(lines[0].split("traceback is in ")[1].split(",")[0])
    assert "Traceback" in where.read_text() and "a bug of ours" in where.read_text()


def test_trusted_model_file_is_imported_with_a_warning(user, capsys, tmp_path) -> None:
    marker = tmp_path / "ran"
    (tmp_path / "m.py").write_text(PAYLOAD_PY.format(marker=str(marker)))
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
    save_checkpoint(model, tmp_path / "c.safetensors", {"model_file": f"{tmp_path / 'm.py'}:build", "in_channels": 3})
    with pytest.raises(UserError, match="--model-file"):
        load_checkpoint(tmp_path / "c.safetensors")
    assert not marker.exists()
    with pytest.warns(UserWarning, match="runs now"):
        with pytest.raises(UserError):  # it ran (trusted), the weights just do not fit the lazy model
            load_checkpoint(tmp_path / "c.safetensors", trust_model_file=True)
    assert marker.exists()


# --------------------------------------------------------------------------- the CLI: what succeeds, succeeds right


def test_compress_refuses_a_non_empty_out_then_replaces_it_with_overwrite(user, capsys, tmp_path) -> None:
    out = tmp_path / "out"
    base = ["compress", "--model-file", f"{user['model']}:build", "--images", str(user["root"] / "images"),
            "--out", str(out), "--no-latency", "--keep", "0.5"]  # fmt: skip
    code, err = run_cli(base, capsys)
    assert code == 0, err
    first = _snapshot(out)
    assert set(first) >= {"student.safetensors", "student.json", "student.pt2", "report.json"}
    (out / "notes.txt").write_text("mine")
    code, err = run_cli([*base, "--keep", "0.25"], capsys)
    assert_refused(code, err, "--overwrite")
    assert _snapshot(out) == {**first, "notes.txt": b"mine"}
    code, err = run_cli([*base, "--keep", "0.25", "--overwrite"], capsys)
    assert code == 0, err
    after = _snapshot(out)
    assert after["notes.txt"] == b"mine" and after["student.safetensors"] != first["student.safetensors"]
    assert json.loads(after["report.json"])["config"]["keep"] == 0.25
    assert not [p for p in tmp_path.iterdir() if ".crossdistill-" in p.name]


def test_test_images_are_labelled_by_class_name(user, capsys, tmp_path) -> None:
    """test/ holds only 'dog' (index 1 among cat, dog): scored as class 1, not as class 0, so a
    model that always answers 'dog' is right on all of it."""
    code, err = run_cli(["compress", "--model-file", f"{user['model']}:always_dog", "--images",
                         str(user["root"] / "images"), "--test-images", str(user["root"] / "test"),
                         "--out", str(tmp_path / "o"), "--no-latency"], capsys)  # fmt: skip
    assert code == 0, err
    evaluation = json.loads((tmp_path / "o" / "report.json").read_text())["evaluation"]
    assert evaluation["teacher"]["accuracy"] == 1.0 and evaluation["teacher"]["test_images"] == 1
    _, labels, *_rest, classes = images_from_folder(user["root"] / "test", 3, classes=["cat", "dog"])
    assert labels.tolist() == [1] and classes == ["cat", "dog"]
    assert json.loads((tmp_path / "o" / "student.json").read_text())["classes"] == ["cat", "dog"]
    # the student names its model file; evaluate imports it only when told to
    student = str(tmp_path / "o" / "student.safetensors")
    code, err = run_cli(["evaluate", student, "--no-latency"], capsys)
    assert_refused(code, err, "--trust-model-file")
    code, err = run_cli(["evaluate", student, "--no-latency", "--model-file", f"{user['model']}:always_dog"], capsys)
    assert code == 0, err


@pytest.mark.parametrize("fn", ["four", "two"])
def test_two_and_four_channel_first_convs_compress(fn, user, capsys, tmp_path) -> None:
    code, err = run_cli(["compress", "--model-file", f"{user['model']}:{fn}", "--images", str(user["root"] / "images"),
                         "--out", str(tmp_path / "o"), "--no-latency"], capsys)  # fmt: skip
    assert code == 0, err
    assert json.loads((tmp_path / "o" / "student.json").read_text())["in_channels"] == (4 if fn == "four" else 2)


def test_train_teacher_defaults_to_runs_and_refuses_an_existing_out(user, capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    args = [
        "train-teacher",
        "--model",
        "lenet5",
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--data-dir",
        str(user["data"]),
    ]
    code, err = run_cli(args, capsys)
    assert code == 0, err
    out = tmp_path / "runs" / "lenet5_fashion-mnist.safetensors"
    assert out.exists() and not (tmp_path / "teachers").exists()
    before = out.read_bytes()
    code, err = run_cli(args, capsys)
    assert_refused(code, err, "--overwrite")
    assert out.read_bytes() == before
    code, err = run_cli([*args, "--lr", "1e30", "--out", "runs/big.safetensors"], capsys)
    assert_refused(code, err, "training loss became")
    assert not (tmp_path / "runs" / "big.safetensors").exists()


# --------------------------------------------------------------------------- resume files of train-teacher


def _train_args(user, out: Path, epochs: int = 2) -> list[str]:
    return ["train-teacher", "--model", "lenet5", "--epochs", str(epochs), "--batch-size", "16",
            "--data-dir", str(user["data"]), "--out", str(out)]  # fmt: skip


def test_planted_resume_pickle_never_runs(user, capsys, tmp_path) -> None:
    marker = tmp_path / "ran"
    out = tmp_path / "t.safetensors"
    with open(out.with_suffix(".resume.pt"), "wb") as fh:
        pickle.dump({"model": Payload(marker)}, fh)
    code, err = run_cli(_train_args(user, out), capsys)
    assert_refused(code, err, "resume file")
    assert not marker.exists()
    assert (tmp_path / "t.resume.pt.corrupt").exists()  # moved aside: the next run starts over
    code, err = run_cli(_train_args(user, out, epochs=1), capsys)
    assert code == 0, err


def test_resume_for_another_recipe_is_refused(user, capsys, tmp_path) -> None:
    out = tmp_path / "t.safetensors"
    env_kill = os.environ.get("CROSSDISTILL_KILL_AT")
    assert env_kill is None
    resume = out.with_suffix(".resume.pt")
    torch.save({"model": {}, "opt": {}, "sched": {}, "gen": torch.zeros(1), "epoch": 1, "elapsed": 0.0,
                "recipe": {"model": "lenet5", "dataset": "fashion-mnist", "epochs": 5, "batch_size": 16,
                           "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "label_smoothing": 0.0,
                           "warmup_frac": 0.15, "seed": 0}}, resume)  # fmt: skip
    before = resume.read_bytes()
    code, err = run_cli(_train_args(user, out), capsys)
    assert_refused(code, err, "--epochs 5 (now 2)")
    assert resume.read_bytes() == before


# --------------------------------------------------------------------------- the library


def test_library_refusals(user, tmp_path) -> None:
    """The same guarantees through the Python API (one assertion per line, each a separate mistake)."""
    from crossdistill.usermodel import load_model_file

    tiny = load_model_file(f"{user['model']}:build").eval()
    x = torch.randn(4, 3, 12, 12)
    nan_buf = load_model_file(f"{user['model']}:build")
    nan_buf.features[1].running_var[0] = float("inf")
    with pytest.raises(UserError, match="running_var"):
        evaluate(nan_buf, input_shape=(3, 12, 12), latency=False)
    with pytest.raises(UserError, match="running_var"):
        compress(nan_buf, x)
    with pytest.raises(UserError, match="int32"):
        compress(load_model_file(f"{user['model']}:integer"), x)
    with pytest.raises(UserError, match="tuple"):
        compress(load_model_file(f"{user['model']}:pair"), x)
    with pytest.raises(UserError, match="--iterations"):
        compress(tiny, x, solver="adam", iterations=0)
    with pytest.raises(UserError, match="--device"):
        compress(tiny, x, device="tpu")
    with pytest.raises(UserError, match="--keep-file pattern"):
        compress(tiny, x, keep_overrides={"nothing.*": 0.5})
    with pytest.raises(UserError, match="nan or inf|NaN or inf"):
        load_checkpoint(user["root"] / "ckpt" / "nan.safetensors")
    with pytest.raises(UserError, match="--model-file"):
        load_checkpoint(user["root"] / "ckpt" / "trojan.safetensors")
    with pytest.raises(UserError, match="--size"):
        images_from_folder(user["root"] / "images", 3, size=0)
    with pytest.raises(UserError, match="1, 2, 3 or 4"):
        images_from_folder(user["root"] / "images", 5)
    assert not user["marker"].exists()


def test_save_student_refuses_a_non_empty_folder_and_keeps_it(user, tmp_path) -> None:
    from crossdistill.usermodel import load_model_file

    tiny = load_model_file(f"{user['model']}:build").eval()
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("x")
    with pytest.raises(UserError, match="overwrite"):
        save_student(tiny, out, {"model_file": f"{user['model']}:build"}, {}, torch.randn(2, 3, 12, 12), onnx=False)
    assert _snapshot(out) == {"mine.txt": b"x"}


def test_failed_export_leaves_the_previous_set(user, tmp_path) -> None:
    from crossdistill.usermodel import load_model_file

    meta = {"model_file": f"{user['model']}:build"}
    out = tmp_path / "out"
    save_student(load_model_file(f"{user['model']}:build"), out, meta, {"run": 1}, torch.randn(2, 3, 12, 12),
                 onnx=False)  # fmt: skip
    before = _snapshot(out)
    with pytest.raises(UserError, match="torch.export"):
        save_student(load_model_file(f"{user['model']}:untraceable"), out, meta, {"run": 2},
                     torch.randn(2, 3, 12, 12), onnx=False, overwrite=True)  # fmt: skip
    assert _snapshot(out) == before
    assert not [p for p in tmp_path.iterdir() if ".crossdistill-" in p.name]


def test_one_image_exports(user, tmp_path) -> None:
    from crossdistill.usermodel import load_model_file

    tiny = load_model_file(f"{user['model']}:build").eval()
    x = torch.randn(1, 3, 12, 12)
    student, report = compress(tiny, x, keep=0.5)
    paths = save_student(student, tmp_path / "o", {"model_file": f"{user['model']}:build"}, report.to_dict(), x,
                         onnx=False)  # fmt: skip
    program = torch.export.load(str(paths["program"])).module()
    assert program(torch.randn(3, 3, 12, 12)).shape == (3, 2)


def test_bn_train_mode_on_vgg16_runs_on_few_images() -> None:
    vgg = get_model("vgg16", 10, 1).eval()
    x = torch.randn(3, 1, 28, 28)
    student, report = compress(vgg, x, bn_mode="train", include=["features.3"], keep=0.5)
    assert report.params_after < report.params_before
    with pytest.raises(UserError, match="at least 2 images"):
        compress(vgg, x[:1], bn_mode="train", include=["features.3"])


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path) -> None:
    ramp = (np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 257).astype(np.uint16)
    folder = tmp_path / "img" / "a"
    folder.mkdir(parents=True)
    Image.fromarray(ramp).save(folder / "x.png")
    split, _ = __import__("crossdistill.data", fromlist=["load_image_folder"]).load_image_folder(tmp_path / "img",
                                                                                              channels=1)  # fmt: skip
    values = split.images.flatten()
    assert values.max() == 255 and values.min() == 0 and len(values.unique()) == 256  # the full ramp, not 255s


def test_hidden_folders_are_not_classes(tmp_path) -> None:
    for c in ("cat", ".git", "__MACOSX", "dog"):
        _png(tmp_path / c / "0.png", np.zeros((8, 8, 3), np.uint8))
    _, labels, _, _, classes = images_from_folder(tmp_path, 3)
    assert classes == ["cat", "dog"] and labels.tolist() == [0, 1]


def test_stale_folders_of_dead_runs_are_cleaned_and_an_aside_folder_restored(tmp_path) -> None:
    dead = 2**22 + 12345  # above the default pid_max: no such process
    out = tmp_path / "out"
    old = tmp_path / f".out.crossdistill-old-{dead}"
    old.mkdir()
    (old / "student.safetensors").write_text("previous complete set")
    (tmp_path / f".out.crossdistill-tmp-{dead}").mkdir()
    clean_stale(out)
    assert (out / "student.safetensors").read_text() == "previous complete set"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(RuntimeError):
        write_folder(out, lambda tmp: (tmp / "half").write_text("x") and (_ for _ in ()).throw(RuntimeError()),
                     overwrite=True)  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and _snapshot(out) == {
        "student.safetensors": b"previous complete set"
    }


# --------------------------------------------------------------------------- kill -9 and SIGTERM, real processes


def _subprocess(argv: list[str], kill_at: str | None = None, sig: str = "KILL") -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("CROSSDISTILL_KILL_AT", None)
    if kill_at:
        env["CROSSDISTILL_KILL_AT"], env["CROSSDISTILL_KILL_SIGNAL"] = kill_at, sig
    code = (
        "import sys, torch; torch.set_num_threads(1); from crossdistill.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    return subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("point", "sig"),
    [("student-weights-written", "KILL"), ("outdir-written", "KILL"), ("outdir-written", "TERM"),
     ("outdir-exchanged", "KILL")],
)  # fmt: skip
def test_killed_compress_leaves_the_previous_complete_set(point, sig, user, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    base = ["compress", "--model-file", f"{user['model']}:build", "--images", str(user["root"] / "images"),
            "--out", str(out), "--no-latency", "--overwrite"]  # fmt: skip
    code, err = run_cli([*base, "--keep", "0.5"], capsys)  # in-process: only the killed run needs a process
    assert code == 0, err
    before = _snapshot(out)
    killed = _subprocess([*base, "--keep", "0.25"], kill_at=point, sig=sig)
    assert killed.returncode == -getattr(signal, f"SIG{sig}")
    after = _snapshot(out)
    if point == "outdir-exchanged":  # the swap happened: the new complete set
        assert json.loads(after["report.json"])["config"]["keep"] == 0.25
        assert after["student.safetensors"] != before["student.safetensors"]
    else:
        assert after == before
    student, _ = load_checkpoint(out / "student.safetensors", model_file=f"{user['model']}:build")
    program = torch.export.load(str(out / "student.pt2")).module()
    x = torch.randn(2, 3, 12, 12)
    assert torch.allclose(student(x), program(x), atol=1e-5)  # the files of the set agree
    code, err = run_cli([*base, "--keep", "0.25"], capsys)  # the next run cleans the dead run's leftovers
    assert code == 0, err
    assert not [p for p in tmp_path.iterdir() if ".crossdistill-" in p.name]


def test_compress_killed_before_a_first_output_leaves_nothing(user, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    argv = ["compress", "--model-file", f"{user['model']}:build", "--images", str(user["root"] / "images"),
            "--out", str(out), "--no-latency"]  # fmt: skip
    killed = _subprocess(argv, kill_at="student-weights-written")
    assert killed.returncode == -signal.SIGKILL and not out.exists()
    assert [p.name for p in tmp_path.iterdir() if ".crossdistill-tmp-" in p.name]  # the dead run's leftover
    code, err = run_cli(argv, capsys)  # not "non-empty": the leftover is ours, and it is cleaned
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("point", ["train-epoch-1", "train-epoch-2-mid", "train-before-save"])
def test_killed_teacher_resumes_bit_identical(point, user, tmp_path, capsys, reference_teacher) -> None:
    out = tmp_path / "t.safetensors"
    killed = _subprocess(_train_args(user, out, epochs=2), kill_at=point)
    assert killed.returncode == -signal.SIGKILL and not out.exists()
    assert out.with_suffix(".resume.pt").exists()
    capsys.readouterr()
    assert cli.main(_train_args(user, out, epochs=2)) == 0
    assert "resuming" in capsys.readouterr().out
    assert out.read_bytes() == reference_teacher  # bit-identical weights


@pytest.fixture(scope="module")
def reference_teacher(user, tmp_path_factory) -> bytes:
    """The same recipe, never interrupted (in-process, one thread like the resumed runs)."""
    out = tmp_path_factory.mktemp("ref") / "t.safetensors"
    assert cli.main(_train_args(user, out, epochs=2)) == 0
    return out.read_bytes()


def test_without_an_atomic_exchange_the_folder_is_renamed_aside_and_user_files_kept(tmp_path, monkeypatch) -> None:
    import crossdistill.outdir as outdir

    monkeypatch.setattr(outdir, "_exchange", lambda a, b: False)  # filesystems without renameat2
    out = tmp_path / "out"
    write_folder(out, lambda tmp: (tmp / "report.json").write_text("1"))
    (out / "mine.txt").write_text("user's")
    with pytest.raises(UserError, match="--overwrite"):
        write_folder(out, lambda tmp: (tmp / "report.json").write_text("2"))
    write_folder(out, lambda tmp: (tmp / "report.json").write_text("2"), overwrite=True)
    assert _snapshot(out) == {"report.json": b"2", "mine.txt": b"user's"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
