"""NuClick: one polygon ROI per nucleus, from the Point ROIs you placed (nuclick-bridge).

The OMERO.scripts shell a facility admin uploads once, from the folder above
this one (the folder it is uploaded from names the menu):

    cd omero_scripts && omero script upload nuclick_bridge/NuClick_Segment_Nuclei.py --official

Users then find it in OMERO.web under Scripts > Nuclick Bridge > NuClick
Segment Nuclei and run it on selected Images, Datasets, Projects, Plates or
Screens.  The work
is done by the nuclick-bridge package (bridge.connectors.omero.script), which
must be installed, without torch, in the Python that runs OMERO's scripts
(OMERO.server's venv, which already has omero-py): ``pip install
/path/to/nuclick-bridge``.  Segmentation runs on a NuClick server
(``nuclick-bridge serve``) over gRPC.  README: section "OMERO.web".

Admin: set DEFAULT_SERVER below to your NuClick server before uploading; it is
the default users see in the form.  If that server wants a token
('nuclick-bridge serve --token-file') or uses TLS, set TOKEN_FILE and CA_FILE
to files on the OMERO server that the account OMERO runs as can read (never
the token itself: users can read this script).
"""

import sys

import omero.scripts as scripts
from omero.rtypes import rlong, rstring

DEFAULT_SERVER = "127.0.0.1:50051"  # admin: the NuClick server's HOST:PORT
TOKEN_FILE = ""  # admin: e.g. "/opt/omero/nuclick/token" (one bearer token), or "" for none
CA_FILE = ""  # admin: e.g. "/opt/omero/nuclick/ca.pem" (turns TLS on), or "" for plain gRPC

DESCRIPTION = """Segment the nuclei at your Point ROIs with NuClick.

Place one Point per nucleus in OMERO.iviewer (the point's text is its class),
then run this on the Images, Datasets, Projects, Plates or Screens. Each point gets one Polygon
ROI (one ROI each, marked nuclick-bridge); your own ROIs are never changed.
Run it again after adding points: only the new ones are segmented.
Needs 8-bit RGB images. Segmentation runs on the NuClick server."""


def parameters():
    """The form OMERO.web shows (grouping orders the fields)."""
    return [
        scripts.String(
            "Data_Type",
            optional=False,
            grouping="1",
            description="What you selected: Images, Datasets, Projects, Plates or Screens (every field of every well)",
            values=[rstring(t) for t in ("Image", "Dataset", "Project", "Plate", "Screen")],
            default="Dataset",
        ),
        scripts.List(
            "IDs",
            optional=False,
            grouping="2",
            description="Ids of the selected Images, Datasets, Projects, Plates or Screens",
        ).ofType(rlong(0)),
        scripts.String(
            "NuClick_Server",
            optional=False,
            grouping="3",
            description="Address of the NuClick server, HOST:PORT (set by your OMERO administrator)",
            default=DEFAULT_SERVER,
        ),
        scripts.String(
            "NuClick_Model",
            optional=True,
            grouping="3.1",
            description="Which of the NuClick server's models to use, by name (ask your OMERO administrator); "
            "empty: the server's default model",
            default="",
        ),
        scripts.List(
            "Classes",
            optional=True,
            grouping="4",
            description="Only points with one of these texts (comma-separated, case ignored); empty: every point",
        ).ofType(rstring("")),
        scripts.Bool(
            "Replace_Existing",
            grouping="5",
            description="Segment every point again and delete the polygons this script wrote before "
            "(off: skip points that already have one)",
            default=False,
        ),
        scripts.Bool(
            "Dry_Run",
            grouping="6",
            description="Only report what would be done; write nothing",
            default=False,
        ),
        scripts.Bool(
            "CSV_Report",
            grouping="7",
            description="Attach a CSV file with each image's counts to the selected Datasets/Projects (or Images)",
            default=False,
        ),
        scripts.String("Message", optional=True, description="Summary of the run").out(),
        scripts.Object("File_Annotation", optional=True, description="The CSV report").out(),
    ]


def run_script(client=None):
    kwargs = {} if client is None else {"client": client}
    client = scripts.client(
        "NuClick_Segment_Nuclei.py",
        DESCRIPTION,
        *parameters(),
        authors=["nuclick-bridge"],
        version="1",
        **kwargs,
    )
    try:
        try:
            from bridge.connectors.omero.script import ServerAccess
            from bridge.connectors.omero.script import run_script as run
        except ImportError as exc:
            message = (
                f"Failed: nuclick-bridge is not installed where OMERO runs scripts ({exc}); "
                "ask your OMERO administrator to pip install nuclick-bridge into OMERO.server's Python"
            )
            print(message, file=sys.stderr)
            client.setOutput("Message", rstring(message))
            return None
        return run(client, ServerAccess(DEFAULT_SERVER, TOKEN_FILE, CA_FILE))
    finally:
        client.closeSession()


if __name__ == "__main__":
    run_script()
