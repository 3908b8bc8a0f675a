"""Where a conversion writes before it is done, and how it lands: a temporary directory inside the repository,
swapped with the model directory in one step at the end, so a failed conversion never leaves half a model and a
server polling the repository sees the old model or the new one, never half of one."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import tempfile
from pathlib import Path


def make_staging(repo: Path, name: str) -> Path:
    """A fresh `.NAME.partial-*` directory inside REPO (PermissionError naming REPO when it is not writable)."""
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"model name {name!r} must be a plain directory name")
    try:
        repo.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=repo))
    except OSError as exc:
        raise PermissionError(f"cannot write to model repository {repo}: {exc.strerror or exc}") from exc


def move_into_place(staging: Path, final: Path) -> None:
    """Replace `final` by `staging`, so readers see the old model or the new one, never half of one.

    An existing `final` is swapped with `staging` in one step (Linux `renameat2(RENAME_EXCHANGE)`): `final` never
    goes missing, and a server polling the repository sees one revision, then the next. Where the filesystem
    cannot (NFS, non-Linux), two renames leave `final` absent for an instant; the server's poller tolerates that
    (service.control: a model is unloaded only after it has been gone for a grace period)."""
    if final.exists() and _exchange(staging, final):
        shutil.rmtree(staging, ignore_errors=True)  # the old model, now under the staging name
        return
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
    staging.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


RENAME_EXCHANGE, AT_FDCWD = 2, -100  # <linux/fs.h>, <fcntl.h>


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths; False where the OS or filesystem cannot (then nothing was changed)."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not Linux, or a libc before glibc 2.28
        return False
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):  # not supported here
        return False
    raise OSError(code, os.strerror(code), str(b))
