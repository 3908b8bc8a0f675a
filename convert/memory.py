"""Memory during a conversion: freed pages go back to the OS, and the source model's weights wait in a file.

A conversion holds the source model for the whole run but needs its weights only while a rewrite reads them;
`ParkedWeights` keeps them in a temporary file in between (mapped back on demand), so peak memory is one model
copy plus the variant being built rather than one copy per variant.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import mmap as mmap_module
import os
import tempfile
import threading
from pathlib import Path


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc keeps them otherwise, and peak RSS
    then grows by one model copy per variant)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


MADV_DONTNEED = 4  # <sys/mman.h> on Linux
PARK_MIN_BYTES = 64 * 1024**2  # smaller models stay in memory (nothing to gain from a file)


class ParkedWeights:
    """A model's parameters kept in a temporary file while the pipeline does not need them.

    Between rewrites the source model only waits for the next variant, while that variant's copy is
    verified, exported, checked and run: parking writes the parameters to a file once and empties them;
    `restore` maps the file back (`torch.load(mmap=True)`: pages are read as the rewrite touches them).
    The Parameter objects stay the same, so tied weights stay tied; only their `.data` is swapped.
    Models under PARK_MIN_BYTES or not on the CPU are left alone.
    """

    def __init__(self, model) -> None:
        self.params = dict(model.named_parameters())
        size = sum(p.numel() * p.element_size() for p in self.params.values())
        self.enabled = size >= PARK_MIN_BYTES and all(p.device.type == "cpu" for p in self.params.values())
        self.path: Path | None = None
        self.parked = False
        self._mapped: dict | None = None  # the mapped state while restored with mmap (keeps the mapping alive)

    def park(self) -> None:
        import torch

        if not self.enabled or self.parked:
            return
        if self.path is None:
            handle, name = tempfile.mkstemp(prefix="normfuse-source-", suffix=".pt")
            os.close(handle)
            self.path = Path(name)
            torch.save({name: p.detach() for name, p in self.params.items()}, str(self.path))
        for param in self.params.values():
            param.data = torch.empty(0, dtype=param.dtype)
        self._mapped = None
        self.parked = True
        release_memory()

    def restore(self, *, mmap: bool = True) -> None:
        import torch

        if not self.parked:
            return
        state = torch.load(str(self.path), mmap=mmap, weights_only=True)
        for name, param in self.params.items():
            param.data = state[name]
        self._mapped = state if mmap else None
        self.parked = False

    def shed(self) -> None:
        """Drop the mapped file's pages from this process's RSS (no-op unless restored with mmap).

        The pages a rewrite has read count in RSS as long as they stay mapped; `MADV_DONTNEED` on the
        file's private, never-written mapping only unmaps them: a later read faults them back in from the
        page cache with the same contents (the rewrites never write a tensor in place).
        """
        if self._mapped is None:
            return
        spans = [(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) for t in self._mapped.values()
                 if t.untyped_storage().nbytes()]
        if not spans:
            return
        page = mmap_module.PAGESIZE
        start = min(ptr for ptr, _ in spans) // page * page  # the mapping starts on a page below the data
        end = -(-max(ptr + size for ptr, size in spans) // page) * page  # and ends on the same last page
        try:
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
        except OSError:  # not glibc
            return
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_DONTNEED)

    @contextlib.contextmanager
    def shedding(self, every: float = 0.02):
        """While the body runs, shed the mapped pages every `every` seconds (a rewrite reads the source
        weight by weight: only the few it has just read stay resident, not the whole 0.5 GB file)."""
        if self._mapped is None:
            yield
            return
        done = threading.Event()

        def loop() -> None:
            while not done.wait(every):
                self.shed()

        thread = threading.Thread(target=loop, name="normfuse-shed", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()
            self.shed()

    def close(self) -> None:
        """Restore the weights into memory (no longer backed by the file) and delete the file."""
        try:
            self.restore(mmap=False)
        finally:
            if self.path is not None:
                self.path.unlink(missing_ok=True)
                self.path = None
