"""``nuclick-bridge omero``: Point ROIs in, one polygon ROI per nucleus out.

Imported when the CLI parser is built, so nothing heavy at module level:
omero-py and the segmenter are imported only in :func:`run`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys

from bridge.commands.common import add_device_options, add_server_options, check_server_options
from bridge.errors import BridgeInputError

DEFAULT_PASSWORD_ENV = "OMERO_PASSWORD"
_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")
INSTALL_HINT = "install it with 'make install-omero' (see the README section 'OMERO')"


class _RefusePassword(argparse.Action):
    """``--password`` exists only to refuse it without echoing the value."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(
            "the password is never taken on the command line (it would show in the process list and shell "
            "history): put it in an environment variable and name that with --password-env"
        )


def add_login_arguments(p: argparse.ArgumentParser, required: bool = True) -> None:
    """The server and login flags, shared with ``adapt --omero`` (where --host
    is checked when --omero is given, so ``required`` is False there)."""
    # No abbreviations: "--password X" must not silently become "--password-env X".
    p.allow_abbrev = False
    g = p.add_argument_group("OMERO server and login (the password is never taken on the command line)")
    g.add_argument("--password", action=_RefusePassword, help=argparse.SUPPRESS)
    g.add_argument("--host", required=required, help="OMERO server host name")
    g.add_argument("--port", type=int, default=4064, help="OMERO server port (default: 4064)")
    g.add_argument("--user", default=None, help="OMERO user name (not needed with a session key)")
    g.add_argument(
        "--password-env",
        default=DEFAULT_PASSWORD_ENV,
        metavar="VAR",
        help=f"environment variable that holds the password (default: {DEFAULT_PASSWORD_ENV})",
    )
    g.add_argument(
        "--session-key",
        default=None,
        metavar="KEY",
        help="join an existing session instead of logging in (e.g. from 'omero sessions key'); "
        "visible to other local users in the process list, so prefer --session-key-env",
    )
    g.add_argument(
        "--session-key-env", default=None, metavar="VAR", help="environment variable that holds a session key"
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_login_arguments(p)
    which = p.add_argument_group("images").add_mutually_exclusive_group(required=True)
    which.add_argument("--image", type=int, nargs="+", action="extend", metavar="ID", help="image id(s)")
    which.add_argument("--dataset", type=int, metavar="ID", help="every image of this dataset")
    which.add_argument("--project", type=int, metavar="ID", help="every image of every dataset of this project")

    run = p.add_argument_group("what to do")
    run.add_argument(
        "--replace",
        action="store_true",
        help="delete the polygon ROIs nuclick-bridge wrote earlier and segment every point again "
        "(default: skip points that already have one)",
    )
    run.add_argument(
        "--classes",
        nargs="+",
        metavar="CLASS",
        help="only points whose text is one of these (case ignored); with --replace only their polygons are "
        "replaced (default: every point)",
    )
    run.add_argument("--dry-run", action="store_true", help="print what would be done; write nothing")
    run.add_argument(
        "--max-tile", type=int, default=2048, metavar="PX", help="largest pixel window read at once (default: 2048)"
    )
    run.add_argument(
        "--delete-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="how long to wait for the server to delete an image's earlier ROIs; past it the image is reported "
        "and the next run deletes what is left (default: 60)",
    )

    eng = p.add_argument_group("segmentation")
    add_server_options(eng)
    eng.add_argument(
        "--method",
        default="nuclick",
        choices=("nuclick", "watershed"),
        help="nuclick (the trained network, default) or watershed (the paper's baseline, no weights needed)",
    )
    eng.add_argument("--weights", default=None, metavar="FILE", help="NuClick weights file (default: shipped)")
    add_device_options(eng)
    eng.add_argument("--batch-size", type=int, default=32, metavar="N", help="patches per network batch")
    eng.add_argument("--threshold", type=float, default=None, help="probability threshold (default: the model's)")
    eng.add_argument("--tolerance", type=float, default=0.5, help="polygon simplification in px (default: 0.5)")


def _secret(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """(password, session key) from the environment or --session-key; never printed."""
    key = args.session_key
    if args.session_key_env:
        key = os.environ.get(args.session_key_env) or None
        if key is None:
            var = args.session_key_env if _ENV_NAME.fullmatch(args.session_key_env) else "named by --session-key-env"
            raise BridgeInputError(f"the environment variable {var} is not set")
    if key:
        return None, key
    if not args.user:
        raise BridgeInputError("give --user (with the password in an environment variable) or a session key")
    password = os.environ.get(args.password_env)
    if password is None:
        # Name the variable only if it looks like one: never echo a password passed by mistake.
        var = args.password_env if _ENV_NAME.fullmatch(args.password_env) else "named by --password-env"
        raise BridgeInputError(
            f"no password: set the environment variable {var} "
            "(or name another with --password-env), or use a session key"
        )
    return password, None


def import_gateway():
    """The OMERO connector's gateway module, or one line on how to install omero-py."""
    try:
        from bridge.connectors.omero import gateway
    except ImportError as exc:
        raise BridgeInputError(f"the omero command needs omero-py ({exc}); {INSTALL_HINT}") from exc
    return gateway


def connect_from_args(args: argparse.Namespace) -> tuple[object, bool]:
    """A logged-in connection from the login flags, and whether closing it
    may end the session (not a joined one: that is the user's)."""
    if not args.host:
        raise BridgeInputError("--omero needs --host (and --user with the password in an environment variable)")
    password, session_key = _secret(args)
    conn = import_gateway().connect(
        args.host, args.user, password, port=args.port, session_key=session_key, secure=True
    )
    return conn, session_key is None


def run(args: argparse.Namespace) -> int:
    if args.max_tile < 256:
        raise BridgeInputError("--max-tile must be at least 256")
    if not args.delete_timeout > 0:
        raise BridgeInputError("--delete-timeout must be a positive number of seconds")
    check_server_options(args)  # a bad --server is one line before anything logs in
    password, session_key = _secret(args)
    omero_gateway = import_gateway()

    def login():
        return omero_gateway.connect(
            args.host, args.user, password, port=args.port, session_key=session_key, secure=True
        )

    opened = [login()]  # every connection this command opens, closed at the end

    def relogin():
        with contextlib.suppress(Exception):  # the dead connection: release it before logging in again
            opened[-1].close(hard=session_key is None)
        opened.append(login())
        return opened[-1]

    conn = opened[0]
    segmenter = None
    job = None
    try:
        ids = omero_gateway.image_ids(conn, args.image or (), args.dataset, args.project)
        if not ids:
            raise BridgeInputError("no images to process (the dataset or project is empty)")
        if not args.dry_run:
            from bridge.commands.common import make_segmenter

            segmenter = make_segmenter(args)
        job = omero_gateway.OmeroRun(
            conn,
            segmenter,
            replace=args.replace,
            dry_run=args.dry_run,
            progress=sys.stderr.isatty(),
            max_tile=args.max_tile,
            reconnect=relogin,
            delete_timeout=args.delete_timeout,
            classes=args.classes,
        )
        job.run(ids)
    finally:
        try:
            if job is not None:  # the summary so far, even when the run was interrupted
                print(f"nuclick-bridge omero: {job.summary.line()}", file=sys.stderr)
                print(json.dumps(job.summary.as_dict()), flush=True)
        finally:
            for c in opened:  # a joined session (--session-key) is the user's: detach, never kill it
                with contextlib.suppress(Exception):  # a dead connection must not mask the run's outcome
                    c.close(hard=session_key is None)
            if hasattr(segmenter, "close"):  # e.g. the gRPC client of --server
                segmenter.close()
    # Like the qupath command: non-zero when nothing could be done (no image had points, or all failed).
    reason = job.summary.fatal_reason()
    if reason:
        raise BridgeInputError(reason)
    return 0
