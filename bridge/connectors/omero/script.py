"""What the OMERO.web script does (``omero_scripts/nuclick_bridge/NuClick_Segment_Nuclei.py``
is its thin shell).

Why a module: the file a facility admin uploads must be one script in the
OMERO.scripts form, which OMERO runs once to read its parameters and again for
every job; everything else (checking the parameters, finding the images,
running the OMERO connector, the summary and the CSV report) lives here, where
it is tested and versioned with the connector it drives.

The script runs on the OMERO server, in the user's own session
(``BlitzGateway(client_obj=client)``), and segments nothing itself: the
pixels around the points go to a NuClick server over gRPC
(:class:`bridge.client.NuClickClient`), so the OMERO server needs only the
torch-free install (``pip install nuclick-bridge`` into OMERO.server's
Python, which has omero-py already).  Nothing here
imports torch.  The connector's safety rules hold as on the command line:
an image's new ROIs are saved in one call before any earlier ones of ours
are deleted, the user's ROIs are never touched, and one image's failure is
reported and the run goes on.
"""

from __future__ import annotations

import csv
import os
import sys
import tempfile
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bridge.errors import BridgeInputError
from bridge.targets import parse_target

# Parameter names, as the shell declares them (a test checks they agree).
DATA_TYPE = "Data_Type"
IDS = "IDs"
SERVER = "NuClick_Server"
MODEL = "NuClick_Model"
CLASSES = "Classes"
REPLACE = "Replace_Existing"
DRY_RUN = "Dry_Run"
CSV_REPORT = "CSV_Report"
PARAMETERS = (DATA_TYPE, IDS, SERVER, MODEL, CLASSES, REPLACE, DRY_RUN, CSV_REPORT)

DATA_TYPES = ("Image", "Dataset", "Project", "Plate", "Screen")
CSV_NAMESPACE = "nuclick-bridge/report"
CSV_MIMETYPE = "text/csv"
SERVER_CHECK_TIMEOUT_S = 20.0
CSV_COLUMNS = (
    "image_id",
    "image_name",
    "status",
    "points",
    "to_segment",
    "written",
    "already_done",
    "not_found",
    "invalid",
    "other_class",
    "deleted",
    "error",
)


@dataclass(frozen=True)
class ScriptParams:
    """The job's parameters, checked."""

    data_type: str
    ids: tuple[int, ...]
    server: str
    classes: tuple[str, ...] | None  # None: every point, whatever its text
    replace: bool = False
    dry_run: bool = False
    csv: bool = False
    model: str = ""  # the NuClick server's model, by the name it serves it under; "": its default


# ---------------------------------------------------------------- parameters


def _flag(inputs: Mapping[str, Any], name: str, default: bool) -> bool:
    value = inputs.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise BridgeInputError(f"{name} must be true or false, not {value!r}")
    return value


def _ids(value: Any) -> tuple[int, ...]:
    values = value if isinstance(value, list | tuple) else [] if value is None else [value]
    out: list[int] = []
    for v in values:
        try:
            i = int(str(v).strip()) if not isinstance(v, bool) else None
        except ValueError:
            i = None
        if i is None or i < 1:
            raise BridgeInputError(f"{IDS}: {v!r} is not an OMERO id (a whole number from 1)")
        out.append(i)
    if not out:
        raise BridgeInputError(f"{IDS}: no ids given; select the images, datasets or projects to process")
    return tuple(dict.fromkeys(out))


def _classes(value: Any) -> tuple[str, ...] | None:
    """A list of class names, or one text with commas (as OMERO.web sends a List field); empty: all."""
    values = value if isinstance(value, list | tuple) else [] if value is None else [value]
    names: list[str] = []
    for v in values:
        if not isinstance(v, str):
            raise BridgeInputError(f"{CLASSES}: {v!r} is not a class name (the text of a point)")
        names += [part.strip() for part in v.split(",")]
    names = [n for n in names if n]
    return tuple(dict.fromkeys(names)) or None


def read_params(inputs: Mapping[str, Any], default_server: str = "") -> ScriptParams:
    """The job's inputs (``client.getInputs(unwrap=True)``), checked: one readable line per mistake."""
    data_type = inputs.get(DATA_TYPE)
    if data_type not in DATA_TYPES:
        raise BridgeInputError(f"{DATA_TYPE} must be one of {', '.join(DATA_TYPES)}, not {data_type!r}")
    server = inputs.get(SERVER)
    server = (server if isinstance(server, str) else default_server or "").strip()
    if not server:
        raise BridgeInputError(
            f"{SERVER} is empty: give the address of the NuClick server (HOST:PORT; ask your OMERO administrator)"
        )
    try:
        parse_target(server)
    except BridgeInputError as exc:
        raise BridgeInputError(f"{SERVER}: {exc}") from None
    model = inputs.get(MODEL)
    if model is not None and not isinstance(model, str):
        raise BridgeInputError(f"{MODEL} must be a model name, not {model!r}")
    return ScriptParams(
        model=(model or "").strip(),
        data_type=data_type,
        ids=_ids(inputs.get(IDS)),
        server=server,
        classes=_classes(inputs.get(CLASSES)),
        replace=_flag(inputs, REPLACE, False),
        dry_run=_flag(inputs, DRY_RUN, False),
        csv=_flag(inputs, CSV_REPORT, False),
    )


# ---------------------------------------------------------------- images


def image_ids(conn: Any, params: ScriptParams) -> list[int]:
    """The images to process, in order, without repeats; a missing Dataset or Project is one line."""
    from bridge.connectors.omero import gateway

    if params.data_type == "Image":
        return list(params.ids)
    out: list[int] = []
    key = params.data_type.lower()
    for oid in params.ids:
        found = gateway.image_ids(conn, **{key: oid})
        if not found:
            raise BridgeInputError(f"{params.data_type} {oid} has no images")
        out += found
    return list(dict.fromkeys(out))


# ---------------------------------------------------------------- the NuClick server


@dataclass(frozen=True)
class ServerAccess:
    """How the script reaches the NuClick server, as the admin set it in the shell.

    Token and CA are *files* on the OMERO server, readable by the account
    OMERO runs as: a job parameter would be readable by every user, the
    uploaded script's text too, and OMERO's processor passes scripts only a
    fixed list of environment variables (``omero.processor``), so
    ``NUCLICK_BRIDGE_TOKEN`` set for OMERO.server would not reach them.
    """

    default_server: str = ""
    token_file: str = ""  # one bearer token ('nuclick-bridge serve --token-file')
    ca_file: str = ""  # PEM CA bundle of the server's TLS certificate: turns TLS on


def open_segmenter(server: str, access: ServerAccess = ServerAccess(), model: str = "") -> tuple[Any, Any]:
    """A :class:`~bridge.client.RemoteSegmenter` on ``server``'s model ``model``
    ("" = its default) and the server's :class:`~bridge.client.ServerInfo`,
    after checking that it answers and holds that model."""
    from bridge.client import NuClickClient, RemoteSegmenter
    from bridge.service.auth import read_token_file

    kwargs: dict[str, Any] = {}
    if access.token_file:
        kwargs["token"] = read_token_file(access.token_file)
    if access.ca_file:
        kwargs["root_certificates"] = access.ca_file
    client = NuClickClient.from_env(server, model=model, **kwargs)
    try:
        info = client.info(timeout=SERVER_CHECK_TIMEOUT_S)
    except BaseException:
        client.close()
        raise
    return RemoteSegmenter(client), info


# ---------------------------------------------------------------- the CSV report


def write_csv(path: str, outcomes: Sequence[Any]) -> None:
    """One row per image: what the run did to it (``gateway.ImageOutcome``)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(CSV_COLUMNS)
        for o in outcomes:
            counts = [o.counts.get(c, 0) for c in CSV_COLUMNS[3:-1]]
            out.writerow([o.image_id, o.name, o.status, *counts, o.error])


def _group_of(conn: Any, obj_type: str, oid: int) -> int | None:
    """The group an object lives in (writes about it must happen there), or None if it is not visible."""
    conn.SERVICE_OPTS.setOmeroGroup(-1)
    if obj_type == "Image":
        from bridge.connectors.omero import gateway

        try:
            return gateway.load_image(conn, oid).group_id
        except BridgeInputError:
            return None
    obj = conn.getObject(obj_type, oid)
    return None if obj is None else int(obj.getDetails().group.id.val)


def attach_csv(conn: Any, params: ScriptParams, outcomes: Sequence[Any], run_id: str) -> tuple[list[Any], int]:
    """Upload the report and link it to the selected Datasets or Projects (to each Image when
    Images were selected, as OMERO's own export scripts do).  One FileAnnotation per group:
    an annotation cannot be linked across groups.  Returns the FileAnnotation wrappers and how
    many objects they were linked to."""
    import omero.model

    name = f"nuclick_nuclei_{run_id}.csv"
    targets: dict[int, list[int]] = {}
    for oid in params.ids:
        group = _group_of(conn, params.data_type, oid)
        if group is not None:
            targets.setdefault(group, []).append(oid)
    if not targets:
        raise BridgeInputError(f"none of the selected {params.data_type} objects can be annotated")
    anns = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, name)
        write_csv(path, outcomes)
        for group, oids in targets.items():
            conn.SERVICE_OPTS.setOmeroGroup(group)
            ann = conn.createFileAnnfromLocalFile(
                path,
                origFilePathAndName=name,
                mimetype=CSV_MIMETYPE,
                ns=CSV_NAMESPACE,
                desc=f"nuclick-bridge: nuclei per image, run {run_id}",
            )
            link_class = getattr(omero.model, f"{params.data_type}AnnotationLinkI")
            parent_class = getattr(omero.model, f"{params.data_type}I")
            for oid in oids:
                link = link_class()
                link.setParent(parent_class(oid, False))
                link.setChild(omero.model.FileAnnotationI(ann.getId(), False))
                conn.getUpdateService().saveObject(link, conn.SERVICE_OPTS)
            anns.append(ann)
    return anns, sum(len(oids) for oids in targets.values())


# ---------------------------------------------------------------- the job


@dataclass
class ScriptResult:
    """What the job hands back to OMERO.web: the message, and the CSV's FileAnnotation if one was made."""

    message: str
    ok: bool
    file_annotations: list[Any]
    summary: Any = None


def run(
    conn: Any,
    params: ScriptParams,
    report: Callable[[str], None],
    access: ServerAccess = ServerAccess(),
    segmenter_factory: Callable[[str, ServerAccess, str], Any] = open_segmenter,
) -> ScriptResult:
    """Run the OMERO connector on the selected images with the NuClick server; never raises for bad input."""
    from bridge.connectors.omero.gateway import OmeroRun, describe_error

    segmenter = None
    try:
        ids = image_ids(conn, params)
        what = f"{len(ids)} image(s) from {params.data_type} {', '.join(map(str, params.ids))}"
        if params.classes:
            what += f", points of class {', '.join(params.classes)}"
        report(f"nuclick-bridge: {what}{'; dry run, nothing is written' if params.dry_run else ''}")
        try:
            segmenter, info = segmenter_factory(params.server, access, params.model)
            served = f" ({info.served_name})" if params.model else ""
            report(
                f"NuClick server {params.server}: model {info.model_name} {info.model_version}{served} on {info.device}"
            )
        except BridgeInputError as exc:
            if not params.dry_run:
                raise
            report(f"warning: {exc}; a real run would fail")
        job = OmeroRun(
            conn,
            segmenter,
            replace=params.replace,
            dry_run=params.dry_run,
            classes=params.classes,
            report=report,
        )
        summary = job.run(ids)
        reason = summary.fatal_reason()
        message = f"Failed: {reason}" if reason else summary.line()
        if summary.images_failed and not reason:
            message += " (see the output for each failed image)"
        anns: list[Any] = []
        if params.csv and params.dry_run:
            report("dry run: no CSV report attached")
        elif params.csv:
            try:
                anns, linked = attach_csv(conn, params, job.outcomes, summary.run_id)
                report(f"CSV report attached to {linked} {params.data_type}(s)")
            except Exception as exc:  # the ROIs are written: the report must not hide that
                message += f"; the CSV report could not be attached ({describe_error(exc)})"
        report(summary.line())
        return ScriptResult(message, reason is None, anns, summary)
    except BridgeInputError as exc:
        return ScriptResult(f"Failed: {exc}", False, [])
    except Exception as exc:  # the OMERO server (finding the images), or a bug: one line, the details on stderr
        traceback.print_exc(file=sys.stderr)
        return ScriptResult(f"Failed: {_unexpected(exc)}", False, [])
    finally:
        if segmenter is not None:
            segmenter.close()


def _unexpected(exc: Exception) -> str:
    """One line for an error no check foresaw: the OMERO server's own words, or the exception."""
    import Ice

    from bridge.connectors.omero.gateway import describe_error

    if isinstance(exc, Ice.LocalException):
        return f"the connection to the OMERO server failed ({type(exc).__name__}); try again"
    if isinstance(exc, Ice.Exception):  # omero.ServerError and the like: "SecurityViolation: ..."
        return f"the OMERO server refused: {describe_error(exc)}"
    return f"{type(exc).__name__}: {describe_error(exc)}"


def open_gateway(client: Any) -> Any:
    """The user's own session, as a BlitzGateway (the script never logs in)."""
    from omero.gateway import BlitzGateway

    return BlitzGateway(client_obj=client)


def run_script(client: Any, access: ServerAccess = ServerAccess()) -> ScriptResult:
    """The whole job on an ``omero.scripts.client``: inputs in, progress on stdout, ``Message`` (and
    ``File_Annotation``) out; a failure is a one-line ``Message`` starting with "Failed:" and the same
    line on stderr, which OMERO.web flags in its activities panel."""
    from omero.rtypes import robject, rstring

    def report(line: str) -> None:
        print(line, flush=True)

    try:
        params = read_params(client.getInputs(unwrap=True), access.default_server)
    except BridgeInputError as exc:
        result = ScriptResult(f"Failed: {exc}", False, [])
    else:
        conn = open_gateway(client)
        result = run(conn, params, report, access)
    if not result.ok:
        print(result.message, file=sys.stderr, flush=True)
    client.setOutput("Message", rstring(result.message))
    if result.file_annotations:
        client.setOutput("File_Annotation", robject(result.file_annotations[0]._obj))
    return result
