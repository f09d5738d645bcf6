"""Shared fixtures: the real data beside the repository, small real crops of it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
VAL_IMAGE = "TCGA-21-5786-01Z-00-DX1"


@pytest.fixture(scope="session", autouse=True)
def export_cache(tmp_path_factory) -> Path:
    """The exported-network cache in a folder of the test run's own (the tests
    fill it from empty, and a user's ~/.cache is left alone); tests that need
    another set NUCLICK_BRIDGE_CACHE themselves."""
    folder = tmp_path_factory.mktemp("nuclick-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NUCLICK_BRIDGE_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="session")
def data_root() -> Path:
    if not (DATA / "monuseg" / "images").is_dir():
        pytest.fail(f"the shared data is missing: expected {DATA} beside the repository")
    return DATA


@pytest.fixture(scope="session")
def monuseg_pair(data_root: Path) -> tuple[np.ndarray, np.ndarray]:
    """A real validation image and its instance labels."""
    img = np.asarray(Image.open(data_root / "monuseg" / "images" / f"{VAL_IMAGE}.png").convert("RGB"))
    lab = np.asarray(Image.open(data_root / "monuseg" / "labels" / f"{VAL_IMAGE}.png")).astype(np.int32)
    return img, lab


@pytest.fixture(scope="session")
def crop_pair(monuseg_pair) -> tuple[np.ndarray, np.ndarray]:
    """A 256x256 crop, small enough for CPU tests."""
    img, lab = monuseg_pair
    return np.ascontiguousarray(img[300:556, 400:656]), np.ascontiguousarray(lab[300:556, 400:656])


@pytest.fixture
def cli(capsys):
    """``main()`` in this process (no interpreter start-up), with its exit code and output."""
    from bridge.cli import main

    def call(*args: str) -> subprocess.CompletedProcess:
        rc = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, rc, out, err)

    return call


@pytest.fixture(scope="session")
def tls_pair(tmp_path_factory) -> tuple[Path, Path]:
    """A real self-signed certificate and key for 127.0.0.1/localhost, made by openssl."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: cannot make a test certificate")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"),
            *("-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem"), "-days", "2", "-subj", "/CN=localhost"),
            *("-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
        ],
        check=True,
        capture_output=True,
    )
    return d / "cert.pem", d / "key.pem"
