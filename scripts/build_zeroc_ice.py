#!/usr/bin/env python3
"""Build (once) and cache a zeroc-ice 3.6.5 wheel that works on Python 3.10+.

Why: omero-py needs zeroc-ice 3.6.x, and PyPI only has the 3.6.5 *source*
release, which does not compile on Python 3.11 as it stands.  Two small source
fixes make it build and work with omero-py 5.23:

* ``src/Slice.cpp`` includes ``<eval.h>``, a header Python 3.11 removed (its
  declarations come with ``Python.h``): the include is dropped;
* ``src/Util.cpp`` reads ``PyThreadState_GET()->frame``, a field that became
  private in 3.11: ``PyThreadState_GetFrame()`` (public since 3.9) is used
  instead, and the new reference it returns is released.

Both fixes are valid on 3.9 and 3.10 too, so they are always applied.

Its ``setup.py`` builds one extension (IcePy) from 217 C++ files, which
setuptools compiles one after the other (``build_ext --parallel`` runs
*extensions* in parallel, and there is only one).  A third patch makes it
compile the files of an extension on ``--jobs`` threads (default: every CPU).

What it does: looks for ``zeroc_ice-3.6.5-<this interpreter's tag>.whl`` in
the wheel cache (``--wheel-dir``, default ``$ZEROC_ICE_WHEEL_DIR`` or the
user's cache folder, ``${XDG_CACHE_HOME:-~/.cache}/nuclick-bridge/wheels/
<python tag>-<platform>``, so every clone on the machine shares one build); if
it is not there, fetches the source release from PyPI with ``pip download``,
patches it, checks that the C/C++ headers it links against (OpenSSL, bzip2)
are present (installing Debian's ``libssl-dev libbz2-dev`` with apt-get when
run as root on Debian/Ubuntu), builds the wheel with ``pip wheel`` and moves
it into the cache atomically.
With ``--install`` it then runs ``pip install --find-links CACHE
--only-binary zeroc-ice -e ".[omero]"`` so that pip takes the patched wheel
and never tries the unpatched source.

Run it with the interpreter of the environment that should get omero-py::

    .venv/bin/python scripts/build_zeroc_ice.py --install     # or: make install-omero
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from pathlib import Path

ICE_VERSION = "3.6.5"
REPO = Path(__file__).resolve().parents[1]
JOBS_ENV = "ZEROC_ICE_BUILD_JOBS"  # read by the patched setup.py

# Inserted into setup.py: CCompiler.compile on a thread pool (each file is its own compiler
# process, so threads are enough); MSVC has its own compile() and stays serial.
PARALLEL_COMPILE = f"""
# nuclick-bridge: compile the sources of an extension in parallel (scripts/build_zeroc_ice.py)
import concurrent.futures as _futures
import distutils.ccompiler as _ccompiler


def _parallel_compile(self, sources, output_dir=None, macros=None, include_dirs=None, debug=0,
                      extra_preargs=None, extra_postargs=None, depends=None):
    macros, objects, extra_postargs, pp_opts, build = self._setup_compile(
        output_dir, macros, include_dirs, sources, depends, extra_postargs)
    cc_args = self._get_cc_args(pp_opts, debug, extra_preargs)

    def one(obj):
        if obj in build:
            src, ext = build[obj]
            self._compile(obj, src, ext, cc_args, extra_postargs, pp_opts)

    jobs = max(1, int(os.environ.get("{JOBS_ENV}") or os.cpu_count() or 1))
    with _futures.ThreadPoolExecutor(jobs) as pool:
        list(pool.map(one, objects))  # list(): re-raises the first compile error
    return objects


_ccompiler.CCompiler.compile = _parallel_compile
"""

# (file, text to find, replacement): exact, so a different source fails loudly.
PATCHES = [
    (
        "src/Slice.cpp",
        "#include <compile.h>\n#include <eval.h>\n",
        "#include <compile.h>\n",
    ),
    (
        "src/Util.cpp",
        "    PyFrameObject *f = PyThreadState_GET()->frame;\n"
        '    PyObjectHandle code = PyObject_GetAttrString(reinterpret_cast<PyObject*>(f), STRCAST("f_code"));\n',
        "    PyFrameObject *f = PyThreadState_GetFrame(PyThreadState_GET());\n"
        '    PyObjectHandle code = PyObject_GetAttrString(reinterpret_cast<PyObject*>(f), STRCAST("f_code"));\n'
        "    Py_XDECREF(f);\n",
    ),
    (
        "setup.py",
        "import sys, os, shutil, fnmatch\n",
        "import sys, os, shutil, fnmatch\n" + PARALLEL_COMPILE,
    ),
]

HEADER_PROBE = "#include <openssl/ssl.h>\n#include <bzlib.h>\nint main() { return 0; }\n"
DEBIAN_PACKAGES = ["libssl-dev", "libbz2-dev"]


def log(msg: str) -> None:
    print(f"build_zeroc_ice: {msg}", file=sys.stderr, flush=True)


def default_wheel_dir() -> Path:
    """``$ZEROC_ICE_WHEEL_DIR``, else ``${XDG_CACHE_HOME:-~/.cache}/nuclick-bridge/wheels/cp311-linux_x86_64``:
    outside the clone, so a second clone (or a CI run on the same machine) finds the wheel."""
    if os.environ.get("ZEROC_ICE_WHEEL_DIR"):
        return Path(os.environ["ZEROC_ICE_WHEEL_DIR"])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    plat = sysconfig.get_platform().replace("-", "_").replace(".", "_")
    return cache / "nuclick-bridge" / "wheels" / f"cp{sys.version_info.major}{sys.version_info.minor}-{plat}"


def wheel_tag() -> str:
    """``cp311-cp311-linux_x86_64`` for the running interpreter."""
    ver = f"cp{sys.version_info.major}{sys.version_info.minor}"
    plat = sysconfig.get_platform().replace("-", "_").replace(".", "_")
    return f"{ver}-{ver}-{plat}"


def cached_wheel(wheel_dir: Path) -> Path | None:
    found = sorted(wheel_dir.glob(f"zeroc_ice-{ICE_VERSION}-{wheel_tag()}.whl"))
    return found[0] if found else None


def apply_patches(src: Path) -> None:
    """Apply the 3.11 fixes; idempotent; raises if the source is not as expected."""
    for rel, old, new in PATCHES:
        path = src / rel
        text = path.read_text(encoding="latin-1")
        if new in text and (old in new or old not in text):  # already applied
            continue
        if text.count(old) != 1:
            raise SystemExit(f"build_zeroc_ice: {rel} does not look like zeroc-ice {ICE_VERSION}; cannot patch it")
        path.write_text(text.replace(old, new), encoding="latin-1")
        log(f"patched {rel}")


def headers_present(tmp: Path) -> bool:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        raise SystemExit("build_zeroc_ice: no C++ compiler found (install g++, e.g. apt-get install g++)")
    probe = tmp / "probe.cpp"
    probe.write_text(HEADER_PROBE)
    done = subprocess.run([cxx, "-fsyntax-only", str(probe)], capture_output=True)
    return done.returncode == 0


def ensure_headers(tmp: Path) -> None:
    """OpenSSL and bzip2 development files, which zeroc-ice compiles and links against."""
    if headers_present(tmp):
        return
    is_root = hasattr(os, "geteuid") and os.geteuid() == 0
    if is_root and shutil.which("apt-get"):
        log(f"installing {' '.join(DEBIAN_PACKAGES)} with apt-get")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *DEBIAN_PACKAGES]
        if subprocess.run(cmd, env=env).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, check=True)
            subprocess.run(cmd, env=env, check=True)
        if headers_present(tmp):
            return
    raise SystemExit(
        "build_zeroc_ice: the OpenSSL and bzip2 development headers are missing; install them first "
        "(Debian/Ubuntu: apt-get install libssl-dev libbz2-dev; Fedora: dnf install openssl-devel bzip2-devel)"
    )


def pip(*args: str) -> list[str]:
    return [sys.executable, "-m", "pip", *args]


def build(wheel_dir: Path, jobs: int) -> Path:
    wheel_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="zeroc-ice-") as tmp_name:
        tmp = Path(tmp_name)
        ensure_headers(tmp)
        log(f"downloading the zeroc-ice {ICE_VERSION} source release")
        sdist_dir = tmp / "sdist"
        spec = f"zeroc-ice=={ICE_VERSION}"
        fetch = pip("download", "-q", "--no-binary", ":all:", "--no-deps", spec, "-d", str(sdist_dir))
        subprocess.run(fetch, check=True)
        (sdist,) = sdist_dir.glob("zeroc*ice-*.tar.gz")
        with tarfile.open(sdist) as tar:
            if sys.version_info >= (3, 12):
                tar.extractall(tmp / "src", filter="data")
            else:
                tar.extractall(tmp / "src")  # PyPI's release of a pinned version
        (src,) = (tmp / "src").iterdir()
        apply_patches(src)
        log(f"compiling zeroc-ice {ICE_VERSION} for {wheel_tag()} on {jobs} thread(s) (a few minutes)")
        out = tmp / "wheel"
        env = dict(os.environ, **{JOBS_ENV: str(jobs)})
        subprocess.run(pip("wheel", "-q", "--no-deps", "-w", str(out), str(src)), check=True, env=env)
        (built,) = out.glob("zeroc_ice-*.whl")
        target = wheel_dir / built.name
        staged = wheel_dir / f".{built.name}.part"
        shutil.copyfile(built, staged)
        os.replace(staged, target)  # a concurrent reader never sees half a wheel
    log(f"cached {target}")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--wheel-dir",
        type=Path,
        default=None,
        help="wheel cache (default: $ZEROC_ICE_WHEEL_DIR, else ${XDG_CACHE_HOME:-~/.cache}/nuclick-bridge/wheels/"
        "<python tag>-<platform>)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=os.cpu_count() or 1,
        help="C++ files compiled at once (default: the number of CPUs)",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if the wheel is cached")
    parser.add_argument(
        "--install",
        action="store_true",
        help='then pip install -e ".[omero]" from the repository, taking zeroc-ice from the cache',
    )
    args = parser.parse_args(argv)
    wheel_dir = (args.wheel_dir or default_wheel_dir()).expanduser().resolve()

    wheel = None if args.force else cached_wheel(wheel_dir)
    if wheel is not None:
        log(f"using cached {wheel}")
    else:
        wheel = build(wheel_dir, max(1, args.jobs))
    if args.install:
        log('installing ".[omero]"')
        subprocess.run(
            pip("install", "-q", "--find-links", str(wheel_dir), "--only-binary", "zeroc-ice",
                "-e", f"{REPO}[omero]"),
            check=True,
        )  # fmt: skip
        subprocess.run([sys.executable, "-c", "import Ice, omero.model; omero.model.RoiI()"], check=True)
        log("omero-py is installed and its model classes load")
    return 0


if __name__ == "__main__":
    sys.exit(main())
