"""KenLM's `lmplz` and `build_binary`, built once from the `kenlm` source distribution on PyPI.

They have no binary package for this platform; the sources build with cmake, a C++ compiler, Boost
and zlib into a cache folder (default ~/.cache/asr/kenlm, or $ASR_CACHE).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
from pathlib import Path

from ..errors import ASRError
from ..files import replaced_atomically

KENLM_VERSION = "0.3.0"
BOOST_HEADERS = {"libboost-program-options-dev": "boost/program_options.hpp",
                 "libboost-system-dev": "boost/system/error_code.hpp",
                 "libboost-thread-dev": "boost/thread.hpp",
                 "libboost-test-dev": "boost/test/unit_test.hpp",
                 "zlib1g-dev": "zlib.h"}


class LMError(ASRError, RuntimeError):
    """The LM tools cannot be built or run, or an LM folder is missing or damaged; the message says what."""


def cache_dir() -> Path:
    return Path(os.environ.get("ASR_CACHE", Path.home() / ".cache" / "asr"))


def missing_build_requirements() -> list[str]:
    """Debian packages (or programs) that building KenLM needs and that this machine lacks."""
    missing = [p for p in ("cmake", "g++", "make") if shutil.which(p) is None]
    includes = [Path("/usr/include"), Path("/usr/local/include")]
    missing += [pkg for pkg, header in BOOST_HEADERS.items() if not any((d / header).exists() for d in includes)]
    return missing


def _download_sdist(dest: Path) -> Path:
    """The kenlm source distribution from PyPI (the registry; pip's own index settings are not read)."""
    index = os.environ.get("ASR_PYPI_JSON", "https://pypi.org/pypi")
    try:
        with urllib.request.urlopen(f"{index}/kenlm/json", timeout=60) as r:
            project = json.load(r)
        url = next(u["url"] for u in project["releases"][KENLM_VERSION] if u["packagetype"] == "sdist")
        path = dest / url.rsplit("/", 1)[1]
        with urllib.request.urlopen(url, timeout=300) as r, open(path, "wb") as f:
            shutil.copyfileobj(r, f)
    except (OSError, StopIteration, ValueError, KeyError) as e:
        raise LMError(f"cannot download the kenlm {KENLM_VERSION} source from {index} ({e}); "
                      "download kenlm-*.tar.gz yourself and pass it with --kenlm-source") from None
    return path


def kenlm_tools(source: str | os.PathLike | None = None, jobs: int | None = None, quiet: bool = True
                ) -> tuple[Path, Path]:
    """Paths of `lmplz` and `build_binary`: on PATH, in the cache, or built now from the kenlm sdist."""
    on_path = shutil.which("lmplz"), shutil.which("build_binary")
    if all(on_path):
        return Path(on_path[0]), Path(on_path[1])
    bin_dir = cache_dir() / "kenlm" / "bin"
    tools = bin_dir / "lmplz", bin_dir / "build_binary"
    if all(t.exists() for t in tools):
        return tools
    missing = missing_build_requirements()
    if missing:
        raise LMError("building KenLM's lmplz and build_binary needs: " + ", ".join(missing) +
                      "\n  on Debian/Ubuntu: apt-get install " + " ".join(
                          ["cmake", "g++", "make", *BOOST_HEADERS, "libbz2-dev", "liblzma-dev"]))
    with tempfile.TemporaryDirectory(prefix="kenlm-build-") as tmp:
        tmp = Path(tmp)
        archive = Path(source) if source else _download_sdist(tmp)
        try:
            with tarfile.open(archive) as tar:
                tar.extractall(tmp / "src", filter="data")
        except (OSError, tarfile.TarError) as e:
            raise LMError(f"{archive}: not a kenlm source archive ({e})") from None
        roots = [p.parent for p in (tmp / "src").glob("*/CMakeLists.txt")]
        if not roots:
            raise LMError(f"{archive}: no CMakeLists.txt inside; not a kenlm source archive")
        build = tmp / "build"
        out = subprocess.DEVNULL if quiet else None
        steps = [["cmake", "-S", str(roots[0]), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release"],
                 ["cmake", "--build", str(build), "--target", "lmplz", "build_binary",
                  "-j", str(jobs or os.cpu_count())]]
        for cmd in steps:
            proc = subprocess.run(cmd, stdout=out, stderr=subprocess.PIPE, text=True)
            if proc.returncode != 0:
                raise LMError(f"building KenLM failed at `{' '.join(cmd[:2])}`:\n{proc.stderr[-2000:]}")
        built = [next(build.rglob(tool.name), None) for tool in tools]
        for tool, path in zip(tools, built):
            if path is None:
                raise LMError(f"KenLM built but {tool.name} is not in {build}")
        with replaced_atomically(*tools) as copies:  # both tools or neither: the cache check above wants both
            for path, copy in zip(built, copies):
                shutil.copy2(path, copy)
    return tools
