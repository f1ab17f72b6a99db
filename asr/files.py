"""Writing files and folders atomically: a reader sees the old version or the new one, never half of one.

Everything asr writes that a user keeps (model folders, checkpoints, manifests, LM folders, scoring
results) goes through here, so a crash, a kill or a full disk never leaves a damaged file under the
real name, and never loses the previous version.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


def _ordinary_permissions(path: Path) -> None:
    """mkstemp/mkdtemp make private files; what asr writes is an ordinary file (umask applies).

    Folders, and files their writer made executable (a program), get 0o777 less the umask; others 0o666.
    """
    umask = os.umask(0)
    os.umask(umask)
    executable = path.is_dir() or os.stat(path).st_mode & 0o111
    os.chmod(path, (0o777 if executable else 0o666) & ~umask)


@contextlib.contextmanager
def replaced_atomically(*paths: str | os.PathLike) -> Iterator[list[Path]]:
    """Temporary paths beside `paths` to write; when the block ends without error, each replaces its target.

    All files are written (and flushed to disk) before any target is replaced, so related files (e.g.
    results and their summary) change together; on error the targets are untouched and the temporaries go.
    """
    targets = [Path(p) for p in paths]
    temps = []
    try:
        for target in targets:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
            os.close(fd)
            temps.append(Path(name))
        yield temps
        for tmp in temps:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            _ordinary_permissions(tmp)
        for tmp, target in zip(temps, targets):
            os.replace(tmp, target)
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """Write a text file (UTF-8) so that it is either the old file or the whole new one."""
    with replaced_atomically(path) as (tmp,):
        tmp.write_text(text, encoding="utf-8")


def write_dir_atomically(final: str | os.PathLike, write: Any) -> None:
    """Call `write(tmp_dir)`, then move tmp_dir to `final`, replacing any old folder.

    The old folder is only removed after the new one is complete; a crash in between leaves
    `final.old`, which `recover_dir` puts back.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(final)  # `final.old` may be the only copy (an earlier kill): never delete it below
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    try:
        write(tmp)
        _ordinary_permissions(tmp)
        for f in tmp.rglob("*"):
            _ordinary_permissions(f)
            if f.is_file():  # on disk before the rename makes them the real folder
                with open(f, "rb") as handle:
                    os.fsync(handle.fileno())
        old = final.with_name(final.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def recover_dir(final: str | os.PathLike) -> None:
    """Undo a folder swap interrupted between its two renames (`final.old` is back as `final`)."""
    old = Path(final).with_name(Path(final).name + ".old")
    if old.exists() and not Path(final).exists():
        os.replace(old, final)


def discard_dir(path: str | os.PathLike) -> None:
    """Delete a folder so that a kill midway never leaves a half-deleted folder under its name.

    It is first renamed to a temporary name (`.NAME.tmp-*`), which `remove_leftovers` deletes when a
    kill interrupts the deletion.
    """
    path = Path(path)
    gone = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    os.replace(path, gone)  # a folder may replace an empty one
    shutil.rmtree(gone, ignore_errors=True)


def remove_leftovers(folder: str | os.PathLike, *names: str) -> list[Path]:
    """Clean up what kills during atomic writes left in `folder` for the given names (glob patterns).

    A `NAME.old` whose NAME is missing (a kill between a folder swap's two renames) is put back; then the
    temporaries (`.NAME.tmp-*` folders, `.NAME.*.tmp` files) and leftover `NAME.old` copies are deleted.
    Returns what was deleted.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    for name in names:
        for old in folder.glob(f"{name}.old"):
            recover_dir(old.with_name(old.name[: -len(".old")]))
    leftovers = sorted({p for name in names for pattern in (f".{name}.tmp-*", f".{name}.*.tmp", f"{name}.old")
                        for p in folder.glob(pattern)})
    for p in leftovers:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return leftovers
