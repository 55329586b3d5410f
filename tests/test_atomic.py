"""ast_core.atomic: the one implementation of atomic writes."""

from __future__ import annotations

from pathlib import Path

import pytest

from ast_core.atomic import atomic_path, atomic_write_json, atomic_write_text


def test_write_replaces_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    p = tmp_path / "sub" / "a.json"
    atomic_write_json(p, {"b": 1, "a": [1, 2]})
    atomic_write_json(p, {"a": 2})
    assert p.read_text() == '{\n  "a": 2\n}\n'
    assert [f.name for f in p.parent.iterdir()] == ["a.json"]


def test_a_failed_write_keeps_the_previous_file(tmp_path: Path) -> None:
    p = tmp_path / "model.bin"
    atomic_write_text(p, "old")
    with pytest.raises(RuntimeError, match="writer died"):
        with atomic_path(p) as tmp:
            tmp.write_text("half of the new conte")
            raise RuntimeError("writer died")
    assert p.read_text() == "old"
    assert [f.name for f in tmp_path.iterdir()] == ["model.bin"]


def test_suffix_is_kept_for_writers_that_read_the_extension(tmp_path: Path) -> None:
    seen = []
    with atomic_path(tmp_path / "plot.png", suffix=".png") as tmp:
        seen.append(tmp.suffix)
        tmp.write_bytes(b"\x89PNG")
    assert seen == [".png"] and (tmp_path / "plot.png").read_bytes() == b"\x89PNG"
    assert [f.name for f in tmp_path.iterdir()] == ["plot.png"]
