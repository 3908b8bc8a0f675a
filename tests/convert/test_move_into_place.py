"""convert's last step, `move_into_place`: a model directory is replaced so that a reader (a polling server) sees the
old model or the new one, never half of one, and, where the filesystem can swap two directories, never none."""

import shutil
import threading

import pytest

from convert import staging
from convert.staging import move_into_place


def stage(parent, text: str):
    staging = parent / f".m.partial-{text}"
    staging.mkdir()
    (staging / "manifest.json").write_text(text)
    return staging


def test_the_model_directory_is_never_missing_while_replaced(tmp_path):
    final = tmp_path / "m"
    move_into_place(stage(tmp_path, "0"), final)
    probe = stage(tmp_path, "probe")
    if not staging._exchange(probe, final):
        pytest.skip("this filesystem cannot swap two directories in one step (the poller's grace covers it)")
    shutil.rmtree(probe)  # now holding the first model
    seen, stop = [], threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                seen.append((final / "manifest.json").read_text())
            except FileNotFoundError:
                seen.append(None)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(1, 200):
            move_into_place(stage(tmp_path, str(i)), final)
    finally:
        stop.set()
        thread.join()
    assert None not in seen and len(seen) > 0
    assert (final / "manifest.json").read_text() == "199"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # every old copy removed


def test_without_an_atomic_swap_two_renames_still_replace_it(tmp_path, monkeypatch):
    monkeypatch.setattr(staging, "_exchange", lambda a, b: False)  # e.g. NFS: EINVAL from renameat2
    final = tmp_path / "m"
    move_into_place(stage(tmp_path, "old"), final)
    move_into_place(stage(tmp_path, "new"), final)
    assert (final / "manifest.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
