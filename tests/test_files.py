"""polar_train.files: atomic writes leave either the old file or the new one, never a part."""

from __future__ import annotations

from pathlib import Path

import pytest

from polar_train.files import fsync_tree, publish_dir, temporary_name, write_atomically, write_bytes, write_text


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


def test_publish_dir_renames_a_whole_folder_into_place(tmp_path: Path) -> None:
    def written(text: str) -> Path:
        tmp = temporary_name(tmp_path / "hf")
        tmp.mkdir()
        (tmp / "config.json").write_text(text)
        return tmp

    assert publish_dir(written("1"), tmp_path / "hf") == tmp_path / "hf"
    publish_dir(written("2"), tmp_path / "hf")  # the old folder swapped out and removed
    assert (tmp_path / "hf" / "config.json").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    loser = written("3")
    with pytest.raises(OSError):  # another writer got there first: its folder is kept
        publish_dir(loser, tmp_path / "hf", replace=False)
    assert (tmp_path / "hf" / "config.json").read_text() == "2" and (loser / "config.json").read_text() == "3"
