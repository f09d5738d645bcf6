"""The OMERO.web script (omero_scripts/nuclick_bridge/NuClick_Segment_Nuclei.py
and bridge.connectors.omero.script).

The uploaded file is read by omero-py's own ``omero.scripts.parse_file`` (what
``omero script upload`` and OMERO.web do to build the form) and run as a job
through ``omero.scripts.client`` with :class:`ScriptClient` standing in for the
session (tests/support/omero_script_client.py), on the in-memory OMERO of the
connector's tests (real ``omero.model`` objects, real MoNuSeg pixels) and a
real NuClick server on 127.0.0.1.  A job against a real OMERO server runs when
OMERO_HOST, OMERO_USER, OMERO_PASSWORD and NUCLICK_TEST_SERVER are set.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import os
import socket
import sys
from pathlib import Path

import numpy as np
import omero_env
import pytest
from scipy import ndimage as ndi

if reason := omero_env.skip_reason():
    pytest.skip(reason, allow_module_level=True)
import omero
import omero.scripts
from omero.model import FileAnnotationI, PolygonI
from omero.rtypes import rlong, rstring, unwrap

from bridge.connectors.omero import script
from bridge.connectors.omero.core import parse_description, polygon_points
from bridge.connectors.omero.model import records_from_rois
from bridge.errors import BridgeInputError
from bridge.io.imageio import ArrayReader
from bridge.service.server import NuClickServer
from support.models import TextureModel, engine_for
from support.omero_memory import OTHER_GROUP, ScriptOmero, point_roi
from support.omero_script_client import ScriptClient

SHELL = Path(__file__).resolve().parents[1] / "omero_scripts" / "nuclick_bridge" / "NuClick_Segment_Nuclei.py"


# ---------------------------------------------------------------- fixtures


def load_shell():
    """The uploaded file as a module (OMERO runs it as __main__; here its run_script is called)."""
    spec = importlib.util.spec_from_file_location("nuclick_omero_script_shell", SHELL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def nuclick():
    """A real NuClick server on 127.0.0.1 (a real network with known behaviour) and the same engine."""
    engine = engine_for(TextureModel(), "texture")
    srv = NuClickServer(engine_for(TextureModel(), "texture"), port=0, http_port=None).start()
    yield f"127.0.0.1:{srv.grpc_port}", engine
    srv.stop(grace=1)


@pytest.fixture(scope="module")
def crop_and_centres(monuseg_pair):
    """A real 400 x 400 crop and 8 nuclei centres well inside it."""
    img, lab = monuseg_pair
    crop, lab = np.ascontiguousarray(img[:400, :400]), lab[:400, :400]
    ids = np.unique(lab)[1:]
    com = ndi.center_of_mass(lab > 0, lab, ids)
    xy = [(c + 0.5, r + 0.5) for i, (r, c) in zip(ids, com, strict=True) if lab[int(r), int(c)] == i]
    inside = [(x, y) for x, y in xy if 25 < x < 375 and 25 < y < 375]
    return crop, inside[:: max(1, len(inside) // 8)][:8]


def two_images_in_a_dataset(crop, centres, classes=("Tumor", "Stroma")):
    """Images 1 and 2 (the same real crop) in dataset 51 of project 61; alternating point classes."""
    server = ScriptOmero()
    for iid in (1, 2):
        server.add_image(iid, crop, name=f"slide {iid}")
        pts = [(x, y, None, None, classes[k % len(classes)]) for k, (x, y) in enumerate(centres)]
        server.add_rois(iid, [point_roi(*pts)])
    server.datasets[51] = [1, 2]
    server.projects[61] = [51]
    return server


def job(server, monkeypatch, capsys, shell_settings=None, **inputs):
    """Run the uploaded script as OMERO would, on ``inputs``, with the admin's ``shell_settings``
    (e.g. TOKEN_FILE); (client, stdout, stderr)."""
    monkeypatch.setattr(script, "open_gateway", lambda client: server.connect())
    client = ScriptClient(inputs)
    shell = load_shell()
    for name, value in (shell_settings or {}).items():
        assert hasattr(shell, name)
        setattr(shell, name, value)
    shell.run_script(client=client)
    out, err = capsys.readouterr()
    return client, out, err


def message(client) -> str:
    return unwrap(client.outputs["Message"])


def ours(server, iid):
    """{source point id: polygon points string} of our ROIs on an image."""
    out = {}
    for roi in server.ours(iid):
        (shape,) = roi.copyShapes()
        assert isinstance(shape, PolygonI)
        out[int(parse_description(unwrap(roi.getDescription()))[0])] = unwrap(shape.getPoints())
    return out


def expected(engine, server, iid, crop, only=None):
    """{point id: polygon string} the same network gives in-process with the whole image in memory."""
    points, _ = records_from_rois(server.rois[iid])
    points = [p for p in points if only is None or p.class_name in only]
    seg = engine.segment(ArrayReader(crop), [p.click() for p in points]).results
    return {p.shape_id: polygon_points(r.polygon) for p, r in zip(points, seg, strict=True) if r.found}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------- the uploaded file


def test_omero_reads_the_form_from_the_uploaded_file():
    params = omero.scripts.parse_file(str(SHELL))  # omero-py's own parse, as at upload
    assert params.name == "NuClick_Segment_Nuclei.py"
    assert set(params.inputs) == set(script.PARAMETERS)
    assert {"Message", "File_Annotation"} <= set(params.outputs)
    assert unwrap(params.inputs["Data_Type"].values) == list(script.DATA_TYPES)
    assert unwrap(params.inputs["NuClick_Server"].prototype) == load_shell().DEFAULT_SERVER
    assert not params.inputs["IDs"].optional and not params.inputs["Data_Type"].optional
    assert isinstance(params.inputs["IDs"].prototype.val[0], omero.RLong)
    for name in script.PARAMETERS:
        assert params.inputs[name].description, name  # every field says what it is for
    defaults = {k: unwrap(params.inputs[k].prototype) for k in ("Replace_Existing", "Dry_Run", "CSV_Report")}
    assert defaults == {"Replace_Existing": False, "Dry_Run": False, "CSV_Report": False}

    # what the server checks before a job starts (omero-py's validate_inputs)
    ok = {"Data_Type": rstring("Dataset"), "IDs": omero.rtypes.rlist([rlong(51)]), "NuClick_Server": rstring("a:1")}
    assert omero.scripts.validate_inputs(params, ok) == ""
    assert "IDs" in omero.scripts.validate_inputs(params, {k: v for k, v in ok.items() if k != "IDs"})
    assert "Well" in omero.scripts.validate_inputs(params, {**ok, "Data_Type": rstring("Well")})


def test_a_job_with_inputs_omero_refuses_never_starts(monkeypatch, capsys):
    server = ScriptOmero()
    with pytest.raises(omero.ValidationException, match="Data_Type"):
        job(server, monkeypatch, capsys, Data_Type="Well", IDs=[1], NuClick_Server="h:1")
    with pytest.raises(omero.ValidationException, match="IDs"):
        job(server, monkeypatch, capsys, Data_Type="Image", NuClick_Server="h:1")
    assert server.connections == []


# ---------------------------------------------------------------- parameters


def test_read_params_accepts_what_omero_web_sends():
    p = script.read_params(
        {"Data_Type": "Dataset", "IDs": [51, 51, 52], "NuClick_Server": " gpu:50051 ", "Classes": ["Tumor, stroma", ""]}
    )
    assert p == script.ScriptParams("Dataset", (51, 52), "gpu:50051", ("Tumor", "stroma"), False, False, False)
    p = script.read_params(
        {"Data_Type": "Image", "IDs": [3], "Classes": [], "Dry_Run": True, "CSV_Report": True}, default_server="a:1"
    )
    assert (p.server, p.classes, p.dry_run, p.csv, p.replace) == ("a:1", None, True, True, False)


@pytest.mark.parametrize(
    ("inputs", "error"),
    [
        (
            {"Data_Type": "Well", "IDs": [1]},
            "Data_Type must be one of Image, Dataset, Project, Plate, Screen, not 'Well'",
        ),
        ({"Data_Type": "Image", "IDs": []}, "IDs: no ids given; select the images, datasets or projects to process"),
        ({"Data_Type": "Image", "IDs": [0]}, "IDs: 0 is not an OMERO id (a whole number from 1)"),
        ({"Data_Type": "Image", "IDs": ["x"]}, "IDs: 'x' is not an OMERO id (a whole number from 1)"),
        ({"Data_Type": "Image", "IDs": [1], "NuClick_Server": "  "}, "NuClick_Server is empty: give the address"),
        ({"Data_Type": "Image", "IDs": [1], "NuClick_Server": "gpu:notaport"}, "NuClick_Server: "),
        ({"Data_Type": "Image", "IDs": [1], "Dry_Run": "yes"}, "Dry_Run must be true or false, not 'yes'"),
        ({"Data_Type": "Image", "IDs": [1], "Classes": [3]}, "Classes: 3 is not a class name"),
    ],
)
def test_bad_parameters_are_one_line(inputs, error):
    inputs = {"NuClick_Server": "gpu:50051", **inputs}
    with pytest.raises(BridgeInputError) as err:
        script.read_params(inputs)
    assert str(err.value).startswith(error) and "\n" not in str(err.value)


def test_bad_parameters_end_the_job_with_a_message_and_touch_nothing(monkeypatch, capsys):
    server = ScriptOmero()
    client, _out, err = job(server, monkeypatch, capsys, Data_Type="Image", IDs=[1], NuClick_Server="gpu:notaport")
    assert message(client).startswith("Failed: NuClick_Server: ")
    assert err.strip() == message(client) and client.closed
    assert server.connections == []  # not even the gateway was opened


# ---------------------------------------------------------------- a whole job


def test_dataset_job_writes_the_servers_nuclei_and_attaches_the_csv(nuclick, crop_and_centres, monkeypatch, capsys):
    address, engine = nuclick
    crop, centres = crop_and_centres
    server = two_images_in_a_dataset(crop, centres)
    before = server.user_snapshot()
    inputs = {"Data_Type": "Dataset", "IDs": [51], "NuClick_Server": address, "CSV_Report": True}

    client, out, err = job(server, monkeypatch, capsys, **inputs)

    want = expected(engine, server, 1, crop)
    assert len(want) >= 6
    assert ours(server, 1) == want and ours(server, 2) == expected(engine, server, 2, crop)
    assert server.user_snapshot() == before  # the user's Point ROIs are untouched
    msg = message(client)
    assert msg.startswith("2 image(s): 2 ok, 0 failed; 16 point(s): ")
    assert f"{2 * len(want)} polygon ROI(s) written" in msg and err == ""
    # progress on stdout: the plan, the server, each image, the summary
    assert f"nuclick-bridge: 2 image(s) from Dataset 51\nNuClick server {address}: model texture" in out
    assert f"image 1 'slide 1': wrote {len(want)} polygon ROI(s)" in out
    assert "CSV report attached to 1 Dataset(s)" in out and client.closed

    ann = client.outputs["File_Annotation"].getValue()
    assert isinstance(ann, FileAnnotationI)
    aid = unwrap(ann.getId())
    assert server.links == [("Dataset", 51, aid)]
    stored = server.annotations[aid]
    assert unwrap(stored.getNs()) == script.CSV_NAMESPACE
    assert unwrap(stored.getFile().getMimetype()) == "text/csv"
    rows = list(csv.DictReader(io.StringIO(server.csv_text(aid))))
    assert [(r["image_id"], r["image_name"], r["status"]) for r in rows] == [
        ("1", "slide 1", "ok"),
        ("2", "slide 2", "ok"),
    ]
    for r, iid in zip(rows, (1, 2), strict=True):
        assert int(r["written"]) == len(server.ours(iid)) and int(r["points"]) == len(centres)
        assert int(r["written"]) + int(r["not_found"]) == len(centres) and r["error"] == ""

    # the same job again: nothing new to do, nothing duplicated
    client, out, _ = job(server, monkeypatch, capsys, **{**inputs, "CSV_Report": False})
    assert " 0 polygon ROI(s) written, 16 already done" in message(client)
    assert "File_Annotation" not in client.outputs and ours(server, 1) == want


def test_classes_and_replace(nuclick, crop_and_centres, monkeypatch, capsys):
    address, engine = nuclick
    crop, centres = crop_and_centres
    server = two_images_in_a_dataset(crop, centres)
    base = {"Data_Type": "Image", "IDs": [1], "NuClick_Server": address}

    client, _, _ = job(server, monkeypatch, capsys, **base, Classes=["tumor"])  # case is ignored
    tumour = expected(engine, server, 1, crop, only={"Tumor"})
    assert ours(server, 1) == tumour and "4 point(s) of other classes left alone" in message(client)
    tumour_rois = {unwrap(r.getId()) for r in server.ours(1)}

    # replace with another class: the Tumor nuclei are neither redone nor deleted
    client, _, _ = job(server, monkeypatch, capsys, **base, Classes=["Stroma"], Replace_Existing=True)
    assert tumour_rois <= {unwrap(r.getId()) for r in server.ours(1)}
    assert ours(server, 1) == {**tumour, **expected(engine, server, 1, crop, only={"Stroma"})}

    # replace everything: every polygon is new, none duplicated
    client, _, _ = job(server, monkeypatch, capsys, **base, Replace_Existing=True)
    assert not tumour_rois & {unwrap(r.getId()) for r in server.ours(1)}
    assert ours(server, 1) == expected(engine, server, 1, crop)
    assert f"{len(ours(server, 1))} earlier ROI(s) deleted" in message(client)

    client, _, err = job(server, monkeypatch, capsys, **base, Classes=["Immune"])
    assert message(client) == "Failed: none of the 8 point(s) found has one of the classes asked for"
    assert err.strip() == message(client)


def test_dry_run_writes_nothing_not_even_the_csv(nuclick, crop_and_centres, monkeypatch, capsys):
    address, _ = nuclick
    server = two_images_in_a_dataset(*crop_and_centres)
    client, out, _ = job(
        server,
        monkeypatch,
        capsys,
        Data_Type="Project",
        IDs=[61],
        NuClick_Server=address,
        Dry_Run=True,
        CSV_Report=True,
    )
    assert message(client).startswith("dry run: 2 image(s): 2 ok, 0 failed; 16 point(s): 16 to segment")
    assert "plan: image 1 'slide 1'" in out and "dry run: no CSV report attached" in out
    assert server.saves == [] and server.files == {} and server.links == []


# ---------------------------------------------------------------- failures


def test_screen_job_segments_every_field_of_every_well(nuclick, crop_and_centres, monkeypatch, capsys):
    address, engine = nuclick
    crop, centres = crop_and_centres
    server = two_images_in_a_dataset(crop, centres)  # images 1 and 2 ...
    server.add_image(3, crop, name="B1 field 1")
    server.add_rois(3, [point_roi(*centres[:3])])
    server.plates[71] = [(1, 0, [3]), (0, 0, [1, 2])]  # (row, column, images of its fields): B1, A1
    server.screens[81] = [71]
    inputs = {"Data_Type": "Screen", "IDs": [81], "NuClick_Server": address, "CSV_Report": True}
    client, _, _ = job(server, monkeypatch, capsys, **inputs)

    assert message(client).startswith("3 image(s): 3 ok, 0 failed; 19 point(s)")
    for iid in (1, 2, 3):
        assert ours(server, iid) == expected(engine, server, iid, crop)
    aid = unwrap(client.outputs["File_Annotation"].getValue().getId())
    assert server.links == [("Screen", 81, aid)]
    rows = list(csv.DictReader(io.StringIO(server.csv_text(aid))))
    assert [r["image_id"] for r in rows] == ["1", "2", "3"]  # well A1's fields, then B1's

    client, _, _ = job(server, monkeypatch, capsys, **{**inputs, "Data_Type": "Plate", "IDs": [72]})
    assert message(client) == "Failed: plate 72 not found on the server (or you cannot see it)"


def test_nuclick_server_down(crop_and_centres, monkeypatch, capsys):
    server = two_images_in_a_dataset(*crop_and_centres)
    down = f"127.0.0.1:{free_port()}"
    client, _, err = job(
        server, monkeypatch, capsys, Data_Type="Dataset", IDs=[51], NuClick_Server=down, CSV_Report=True
    )
    assert message(client).startswith(f"Failed: cannot reach the NuClick server at {down} (")
    assert err.strip() == message(client) and "\n" not in message(client)
    assert server.saves == [] and server.files == {} and client.closed

    # a dry run still plans, and warns
    client, out, _ = job(server, monkeypatch, capsys, Data_Type="Dataset", IDs=[51], NuClick_Server=down, Dry_Run=True)
    assert message(client).startswith("dry run: 2 image(s): 2 ok")
    assert f"warning: cannot reach the NuClick server at {down}" in out


def test_a_server_that_wants_a_token_gets_it_from_the_admins_file(crop_and_centres, monkeypatch, capsys, tmp_path):
    server = two_images_in_a_dataset(*crop_and_centres)
    srv = NuClickServer(engine_for(TextureModel(), "texture"), port=0, http_port=None, token="s3cret-t0ken").start()
    address = f"127.0.0.1:{srv.grpc_port}"
    monkeypatch.delenv("NUCLICK_BRIDGE_TOKEN", raising=False)
    inputs = {"Data_Type": "Image", "IDs": [1], "NuClick_Server": address}
    try:
        client, _, _ = job(server, monkeypatch, capsys, **inputs)
        assert message(client).startswith(f"Failed: NuClick server {address}: UNAUTHENTICATED: missing bearer token")
        assert server.saves == []

        missing = tmp_path / "nope"
        client, _, _ = job(server, monkeypatch, capsys, {"TOKEN_FILE": str(missing)}, **inputs)
        assert message(client) == f"Failed: token file not found: {missing}"

        (tmp_path / "token").write_text("s3cret-t0ken\n")
        client, out, _ = job(server, monkeypatch, capsys, {"TOKEN_FILE": str(tmp_path / "token")}, **inputs)
        assert message(client).startswith("1 image(s): 1 ok, 0 failed") and len(server.ours(1)) >= 3
        assert "s3cret" not in message(client) + out
    finally:
        srv.stop(grace=1)


def test_missing_objects(nuclick, crop_and_centres, monkeypatch, capsys):
    address, _ = nuclick
    server = two_images_in_a_dataset(*crop_and_centres)
    client, _, _ = job(server, monkeypatch, capsys, Data_Type="Dataset", IDs=[999], NuClick_Server=address)
    assert message(client) == "Failed: dataset 999 not found on the server (or you cannot see it)"
    client, _, _ = job(server, monkeypatch, capsys, Data_Type="Image", IDs=[404], NuClick_Server=address)
    assert message(client) == "Failed: nothing could be done: all 1 image(s) failed"

    # one missing image of two: the other is done, the CSV says which failed and why
    client, out, _ = job(
        server, monkeypatch, capsys, Data_Type="Image", IDs=[404, 2], NuClick_Server=address, CSV_Report=True
    )
    assert message(client).startswith("2 image(s): 1 ok, 1 failed")
    assert message(client).endswith("(see the output for each failed image)")
    aid = unwrap(client.outputs["File_Annotation"].getValue().getId())
    assert server.links == [("Image", 2, aid)] and "CSV report attached to 1 Image(s)" in out  # not image 404
    rows = list(csv.DictReader(io.StringIO(server.csv_text(aid))))
    assert [(r["image_id"], r["status"]) for r in rows] == [("404", "failed"), ("2", "ok")]
    assert rows[0]["error"] == "image 404 not found on the server (or you cannot see it)"


def test_images_of_another_group_get_their_report_in_their_group(nuclick, crop_and_centres, monkeypatch, capsys):
    address, _ = nuclick
    crop, centres = crop_and_centres
    server = two_images_in_a_dataset(crop, centres)
    server.add_image(3, crop, name="other group", group=OTHER_GROUP)
    server.add_rois(3, [point_roi(*centres[:2])])
    client, _, _ = job(
        server, monkeypatch, capsys, Data_Type="Image", IDs=[1, 3], NuClick_Server=address, CSV_Report=True
    )
    assert message(client).startswith("2 image(s): 2 ok, 0 failed")
    assert len(server.annotations) == 2  # one report per group: a link cannot cross groups
    assert sorted((kind, iid) for kind, iid, _ in server.links) == [("Image", 1), ("Image", 3)]


def test_omero_server_failing_while_finding_images(nuclick, crop_and_centres, monkeypatch, capsys):
    server = two_images_in_a_dataset(*crop_and_centres)
    server.drop = {"getObjects": True}  # the connection drops while listing the dataset's images
    client, _, err = job(server, monkeypatch, capsys, Data_Type="Dataset", IDs=[51], NuClick_Server=nuclick[0])
    assert message(client) == "Failed: the connection to the OMERO server failed (ConnectionLostException); try again"
    assert err.strip().splitlines()[-1] == message(client) and "Traceback" in err  # details for the admin
    assert server.saves == [] and client.closed

    server.drop = {}
    server.refuse = {"getObjects": "not in your group"}
    client, _, _ = job(server, monkeypatch, capsys, Data_Type="Dataset", IDs=[51], NuClick_Server=nuclick[0])
    assert message(client) == "Failed: the OMERO server refused: SecurityViolation: not in your group"


def test_shell_without_the_package_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "bridge.connectors.omero.script", None)  # import fails as if not installed
    client = ScriptClient({"Data_Type": "Image", "IDs": [1], "NuClick_Server": "a:1"})
    load_shell().run_script(client=client)
    assert message(client).startswith("Failed: nuclick-bridge is not installed where OMERO runs scripts")
    assert "pip install nuclick-bridge into OMERO.server's Python" in message(client) and client.closed


# ---------------------------------------------------------------- a real server


@pytest.mark.omero
@pytest.mark.skipif(
    not all(os.environ.get(k) for k in ("OMERO_HOST", "OMERO_USER", "OMERO_PASSWORD", "OMERO_TEST_IMAGE")),
    reason="set OMERO_HOST, OMERO_USER, OMERO_PASSWORD and OMERO_TEST_IMAGE to run a dry-run job on a real server",
)
def test_real_server_dry_run_job(nuclick):
    """A dry run of the script's logic in a real session (nothing is written)."""
    conn = omero_env.connect_real_server()
    try:
        params = script.ScriptParams("Image", (int(os.environ["OMERO_TEST_IMAGE"]),), nuclick[0], None, dry_run=True)
        lines: list[str] = []
        result = script.run(conn, params, lines.append)
        assert result.ok, result.message
        assert result.message.startswith("dry run: 1 image(s): 1 ok")
    finally:
        conn.close()


# ---------------------------------------------------------------- a server of several models


def test_a_job_segments_with_the_model_it_names(crop_and_centres, monkeypatch, capsys):
    """A NuClick server of two models: NuClick_Model picks one (empty: the server's default), and a name the
    server does not hold fails the job in one line before anything is written."""
    params = omero.scripts.parse_file(str(SHELL))
    assert params.inputs["NuClick_Model"].optional and unwrap(params.inputs["NuClick_Model"].prototype) == ""
    engines = {
        "default": engine_for(TextureModel(), "texture"),
        "other": engine_for(TextureModel(6.0, seed=3), "other"),
    }
    srv = NuClickServer(engines, port=0, http_port=None).start()
    address = f"127.0.0.1:{srv.grpc_port}"
    crop, centres = crop_and_centres
    try:
        answers = {}
        for name in ("other", ""):
            server = two_images_in_a_dataset(crop, centres)
            inputs = {"Data_Type": "Image", "IDs": [1], "NuClick_Server": address, "NuClick_Model": name}
            client, out, err = job(server, monkeypatch, capsys, **inputs)
            engine = engines[name or "default"]
            answers[name] = ours(server, 1)
            assert answers[name] == expected(engine, server, 1, crop) and len(answers[name]) >= 6, out + err
            label = "model other test (other)" if name else "model texture test on"
            assert f"NuClick server {address}: {label}" in out
        assert answers["other"] != answers[""]

        server = two_images_in_a_dataset(crop, centres)
        inputs = {"Data_Type": "Image", "IDs": [1], "NuClick_Server": address, "NuClick_Model": "lung"}
        client, _out, err = job(server, monkeypatch, capsys, **inputs)
        assert message(client) == (
            f"Failed: NuClick server {address} has no model named 'lung'; its models are: default, other"
        )
        assert err.strip() == message(client) and server.ours(1) == []
    finally:
        srv.stop(grace=1)
