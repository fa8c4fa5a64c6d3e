"""Atomic writes leave files with the permissions of an ordinary write."""

import os
import stat

import pytest

from closedloop._atomic import atomic_write


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_new_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        with atomic_write(tmp_path / "data.bin") as handle:
            handle.write(b"x")
        with open(tmp_path / "plain.bin", "wb") as handle:
            handle.write(b"x")
    finally:
        os.umask(old)
    mode = stat.S_IMODE(os.stat(tmp_path / "data.bin").st_mode)
    assert mode == 0o666 & ~umask == stat.S_IMODE(os.stat(tmp_path / "plain.bin").st_mode)


def test_rewriting_keeps_the_existing_mode_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "manifest.json"
    path.write_text("{}")
    path.chmod(0o640)
    with atomic_write(path, "w") as handle:
        handle.write("[]")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640 and path.read_text() == "[]"
    assert os.listdir(tmp_path) == ["manifest.json"]
