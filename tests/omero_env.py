"""Whether the OMERO connector tests run: wherever omero-py is installed, whatever the environment says.

Why: ``pytest.importorskip("omero")`` turns an installed but broken omero-py
(its zeroc-ice missing, or built for another Python) into a silent skip.
Here a test module is skipped only when the omero-py distribution is not
installed at all, and never in CI (``make test`` installs it); once it is
installed, failing to import it is an error.  Use it as::

    if reason := omero_env.skip_reason():
        pytest.skip(reason, allow_module_level=True)
    import omero
"""

from __future__ import annotations

import importlib.metadata
import os

INSTALL_HINT = "omero-py is not installed: run 'make install-omero'"


def omero_installed() -> bool:
    try:
        importlib.metadata.distribution("omero-py")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def skip_reason() -> str | None:
    """Why the OMERO tests cannot run here, or None when they must (omero-py installed, or CI)."""
    if omero_installed() or os.environ.get("CI"):
        return None
    return INSTALL_HINT


def connect_real_server():
    """A session on the real OMERO server that OMERO_HOST, OMERO_USER,
    OMERO_PASSWORD (and OMERO_PORT, default 4064) name, for the tests marked
    to need one."""
    from bridge.connectors.omero.gateway import connect

    env = os.environ
    return connect(env["OMERO_HOST"], env["OMERO_USER"], env["OMERO_PASSWORD"], port=int(env.get("OMERO_PORT", "4064")))
