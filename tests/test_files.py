"""polar_train.files: atomic writes leave either the old file or the new one, never a part."""

from __future__ import annotations

from pathlib import Path

import pytest

from polar_train.files import fsync_tree, temporary_name, write_atomically, write_bytes, write_text


def test_atomic_writes_replace_whole_files_and_leave_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    write_text(path, "a: 1\n")
    write_text(path, "a: 2\n")
    assert path.read_text() == "a: 2\n"
    write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"

    def fail(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(path, fail)
    assert path.read_text() == "a: 2\n"  # the old file, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.bin", "config.yaml"]  # no temporary left
    fsync_tree(tmp_path)


def test_temporary_names_are_hidden_and_unique_per_writer(tmp_path: Path) -> None:
    names = {temporary_name(tmp_path / "hf") for _ in range(50)}
    assert len(names) == 50
    assert all(n.parent == tmp_path and n.name.startswith(".hf.tmp-") for n in names)
