"""drp/files.py: a file is either the old one or the whole new one, never half-written."""

import pytest

from drp.errors import DrpError
from drp.files import write_atomically


def test_the_new_file_replaces_the_old_one_and_no_temporary_file_stays(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    assert write_atomically(path, lambda tmp: tmp.write_text("new"), "choose another folder.") == path
    assert path.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_an_interrupted_write_keeps_the_old_file_and_removes_the_half_written_one(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")

    def interrupted(tmp):
        tmp.write_text("ha")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(path, interrupted, "choose another folder.")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_a_folder_that_cannot_take_the_file_is_one_sentence_with_the_advice(tmp_path):
    with pytest.raises(DrpError, match=r"^cannot write .*missing.*\(No such file or directory\); make it\.$"):
        write_atomically(tmp_path / "missing" / "out.txt", lambda tmp: tmp.write_text("x"), "make it.")
    assert list(tmp_path.iterdir()) == []
