"""An output folder written as one unit: every file of a result appears together, or none does.

:func:`write_folder` builds the files in a temporary sibling folder
(``.<name>.crossdistill-tmp-<pid>``) and swaps it in at the end:

- ``--out`` absent: one ``rename`` (atomic);
- ``--out`` an existing folder (``overwrite=True``): an atomic exchange of the
  two folders (Linux ``renameat2(RENAME_EXCHANGE)``), or where that is not
  available: rename the old folder aside (``.crossdistill-old-<pid>``),
  rename the new one in, delete the old one. Files in the old folder that the
  new set does not contain (the user's own) are hard-linked into the new one
  first, so nothing of theirs is lost.

A kill -9 or SIGTERM at any moment leaves either the previous complete folder
or the new complete one at ``--out``; the next run on the same ``--out``
deletes temporary folders of dead runs (and puts an old folder that was
renamed aside back where a run died between the two renames). Two runs on
the same ``--out`` each build their own folder, so the result is one run's
complete set, never a mix.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

from .checks import check_output_dir

__all__ = ["write_folder", "clean_stale", "kill_point"]

_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.crossdistill-(?P<kind>tmp|old)-(?P<pid>\d+)$")


def kill_point(name: str) -> None:
    """Test hook: ``CROSSDISTILL_KILL_AT=<name>`` kills this process with SIGKILL (or SIGTERM with
    ``CROSSDISTILL_KILL_SIGNAL=TERM``) at the named point,
    so tests can interrupt a run deterministically where it matters (between two files, between
    two renames, after an epoch)."""
    if os.environ.get("CROSSDISTILL_KILL_AT") == name:
        sig = os.environ.get("CROSSDISTILL_KILL_SIGNAL", "KILL")  # KILL or TERM
        os.kill(os.getpid(), signal.SIGTERM if sig == "TERM" else signal.SIGKILL)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(out: str | Path) -> None:
    """Remove temporary folders of dead runs next to ``out``; restore an old folder left aside."""
    out = Path(os.path.abspath(out))  # "runs/x/" and "x" alike: the siblings are named after the last part
    if not out.parent.is_dir():
        return
    for entry in out.parent.iterdir():
        m = _LEFTOVER.match(entry.name)
        if not m or m["name"] != out.name or _alive(int(m["pid"])):
            continue
        if m["kind"] == "old" and not out.exists():
            os.rename(entry, out)  # the run died between its two renames: the previous set goes back
        else:
            shutil.rmtree(entry, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0


def _keep_foreign(old: Path, new: Path) -> None:
    """Files the user had in ``old`` that the new set does not replace go into ``new`` too."""
    for entry in old.iterdir():
        target = new / entry.name
        if target.exists() or _LEFTOVER.match(entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, target, symlinks=True)
        else:
            try:
                os.link(entry, target, follow_symlinks=False)
            except OSError:
                shutil.copy2(entry, target, follow_symlinks=False)


def write_folder(out: str | Path, write: Callable[[Path], object], overwrite: bool = False) -> Path:
    """Call ``write(tmp_folder)`` and swap the folder in as ``out``. Refuses a non-empty ``out``
    unless ``overwrite`` (checked before ``write`` runs). Returns ``out``."""
    out = Path(os.path.abspath(out))
    clean_stale(out)
    check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.crossdistill-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        kill_point("outdir-written")
        if out.is_dir():
            _keep_foreign(out, tmp)
            if _exchange(tmp, out):
                kill_point("outdir-exchanged")
                shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the previous set
                return out
            old = out.parent / f".{out.name}.crossdistill-old-{os.getpid()}"
            os.rename(out, old)
            kill_point("outdir-aside")
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
