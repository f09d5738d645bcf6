"""scripts/build_zeroc_ice.py: the patched setup.py compiles an extension's
files in parallel (a real setuptools build of real C files), and the wheel
cache lives outside the clone, where a second clone finds it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from support.scripts import load_script

build = load_script("build_zeroc_ice")

SLEEP = 0.5  # seconds each compile takes in the logging compiler below


def _source_tree(root: Path, n_files: int) -> Path:
    """A tree the size of a thumbnail of zeroc-ice's: the two C++ files the
    script patches (as released) and a setup.py with its import line."""
    src = root / "src"
    src.mkdir(parents=True)
    for rel, old, _ in build.PATCHES:
        if rel != "setup.py":
            (root / rel).write_text(f"// zeroc-ice {build.ICE_VERSION}\n{old}", encoding="latin-1")
    for i in range(n_files):
        (src / f"f{i}.c").write_text(f"int f{i}(void) {{ return {i}; }}\n")
    sources = [f"src/f{i}.c" for i in range(n_files)]
    (root / "setup.py").write_text(
        textwrap.dedent(f"""\
        from setuptools import setup
        from distutils.extension import Extension
        import sys, os, shutil, fnmatch

        setup(name="thumb", version="0", ext_modules=[Extension("thumb", {sources!r})])
        """)
    )
    return root


def _logging_compiler(root: Path) -> Path:
    """A C compiler that records when each compile starts and ends."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    wrapper = root / "cc-log"
    wrapper.write_text(
        textwrap.dedent(f"""\
        #!/bin/sh
        case " $* " in *" -c "*)
            echo "start $(date +%s.%N)" >> {root}/compiles.log
            sleep {SLEEP}
            echo "end $(date +%s.%N)" >> {root}/compiles.log;;
        esac
        exec {cc} "$@"
        """)
    )
    wrapper.chmod(0o755)
    return wrapper


def _most_at_once(log: Path) -> int:
    """The largest number of compiles running at the same moment."""
    events = sorted((float(t), kind == "start") for kind, t in (ln.split() for ln in log.read_text().splitlines()))
    now = most = 0
    for _, starts in events:
        now += 1 if starts else -1
        most = max(most, now)
    return most


@pytest.mark.parametrize("jobs", [1, 4])
def test_patched_setup_compiles_the_files_of_one_extension_in_parallel(tmp_path, jobs):
    root = _source_tree(tmp_path / "src-tree", n_files=4)
    build.apply_patches(root)
    build.apply_patches(root)  # idempotent: the setup.py patch is not inserted twice
    assert (root / "setup.py").read_text().count("def _parallel_compile") == 1
    cc = _logging_compiler(tmp_path)
    env = dict(os.environ, CC=str(cc), **{build.JOBS_ENV: str(jobs)})
    env.pop("LDSHARED", None)
    done = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--build-temp", str(tmp_path / "tmp"),
         "--build-lib", str(tmp_path / "lib")],
        cwd=root, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert len(list((tmp_path / "lib").glob("thumb*.so"))) == 1  # compiled and linked
    assert _most_at_once(tmp_path / "compiles.log") == jobs


def test_the_wheel_cache_is_in_the_users_cache_folder_keyed_by_python_and_platform(tmp_path, monkeypatch):
    monkeypatch.delenv("ZEROC_ICE_WHEEL_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    where = build.default_wheel_dir()
    py = f"cp{sys.version_info.major}{sys.version_info.minor}"
    assert where.parent == tmp_path / "xdg" / "nuclick-bridge" / "wheels"
    assert where.name.startswith(f"{py}-") and build.wheel_tag().endswith(where.name.removeprefix(f"{py}-"))
    monkeypatch.setenv("ZEROC_ICE_WHEEL_DIR", str(tmp_path / "mine"))
    assert build.default_wheel_dir() == tmp_path / "mine"


def test_a_second_clone_finds_the_wheel_and_builds_nothing(tmp_path, monkeypatch, capsys):
    """The wheel the first clone built is found by the script of any clone (here: by its default folder)."""
    monkeypatch.delenv("ZEROC_ICE_WHEEL_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    cache = build.default_wheel_dir()
    cache.mkdir(parents=True)
    wheel = cache / f"zeroc_ice-{build.ICE_VERSION}-{build.wheel_tag()}.whl"
    wheel.write_bytes(b"PK\x05\x06" + bytes(18))  # an empty zip: only its name is looked at here

    def no_build(*args, **kwargs):
        raise AssertionError("built again")

    monkeypatch.setattr(build, "build", no_build)
    assert build.main([]) == 0
    assert f"using cached {wheel}" in capsys.readouterr().err
