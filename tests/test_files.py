"""Atomic writes (asr.files): related files change together, failures change nothing, permissions are ordinary."""

import io
import os
import shutil
import stat
import subprocess
import tarfile

import pytest

from asr.files import remove_leftovers, replaced_atomically, write_text_atomically
from asr.lm import kenlm_tools as kenlm_module


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def test_files_are_replaced_together_or_not_at_all(tmp_path):
    a, b = tmp_path / "results.json", tmp_path / "sub" / "RESULTS.md"
    write_text_atomically(a, "old a")
    with pytest.raises(RuntimeError):
        with replaced_atomically(a, b) as (ta, tb):
            ta.write_text("new a")
            raise RuntimeError("killed before the second file")
    assert a.read_text() == "old a" and not b.exists()
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["results.json", "sub"]  # no temporaries left
    with replaced_atomically(a, b) as (ta, tb):
        assert ta.name.startswith(".results.json.") and ta.name.endswith(".tmp")  # what remove_leftovers knows
        ta.write_text("new a")
        tb.write_text("new b")
    assert (a.read_text(), b.read_text()) == ("new a", "new b")
    assert stat.S_IMODE(a.stat().st_mode) == 0o666 & ~_umask()


def test_a_program_stays_executable(tmp_path):
    tool = tmp_path / "tool"
    with replaced_atomically(tool) as (tmp,):
        tmp.write_text("#!/bin/sh\necho ran\n")
        tmp.chmod(0o755)
    assert stat.S_IMODE(tool.stat().st_mode) == 0o777 & ~_umask()
    assert subprocess.run([str(tool)], capture_output=True, text=True).stdout == "ran\n"


def test_leftovers_of_a_kill_are_recognised(tmp_path):
    (tmp_path / "a.flac").write_bytes(b"finished")
    leftover = tmp_path / ".b.flac.k3j2h1.tmp"  # a kill inside replaced_atomically
    leftover.write_bytes(b"half")
    assert remove_leftovers(tmp_path, "*.flac") == [leftover]
    assert [p.name for p in tmp_path.iterdir()] == ["a.flac"]


FAKE_KENLM = """cmake_minimum_required(VERSION 3.10)
project(fake_kenlm NONE)
foreach(tool lmplz build_binary)
  add_custom_target(${tool} COMMAND ${CMAKE_COMMAND} -E copy ${CMAKE_SOURCE_DIR}/tool.sh ${CMAKE_BINARY_DIR}/${tool})
endforeach()
"""


def test_built_kenlm_tools_are_put_in_the_cache_executable(tmp_path, monkeypatch):
    """kenlm_tools' build and copy steps on a stand-in source archive whose 'tools' are shell scripts."""
    if kenlm_module.missing_build_requirements():
        pytest.skip("cmake, g++, make or Boost missing (tests/install-system-packages.sh installs them)")
    archive = tmp_path / "kenlm-fake.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, text, mode in (("CMakeLists.txt", FAKE_KENLM, 0o644), ("tool.sh", "#!/bin/sh\necho ok\n", 0o755)):
            info = tarfile.TarInfo(f"kenlm-fake/{name}")
            info.size, info.mode = len(text), mode
            tar.addfile(info, io.BytesIO(text.encode()))
    monkeypatch.setenv("ASR_CACHE", str(tmp_path / "cache"))
    which = shutil.which  # none on PATH: they are built
    monkeypatch.setattr(kenlm_module.shutil, "which", lambda name: None if name in ("lmplz", "build_binary")
                        else which(name))
    tools = kenlm_module.kenlm_tools(archive, jobs=1)
    assert [t.name for t in tools] == ["lmplz", "build_binary"]
    assert all(subprocess.run([str(t)], capture_output=True, text=True).stdout == "ok\n" for t in tools)
    assert sorted(p.name for p in tools[0].parent.iterdir()) == ["build_binary", "lmplz"]  # no temporaries
