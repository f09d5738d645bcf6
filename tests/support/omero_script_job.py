"""One OMERO.web script job on an in-memory OMERO, in this process; prints what it did as JSON.

For tests/test_no_torch.py, which runs it in a process without torch:
``omero_script_job.py IMAGE.png POINTS.json NUCLICK_SERVER SHELL.py``.  The
image (a real crop) goes into Dataset 51 with one ROI of Points, the uploaded
script (SHELL.py) runs on it with a CSV report, and the JSON holds the
Message, each point's level-0 click, the polygons written, the CSV and the
engine modules that were imported (there must be none).  Needs tests/ on PYTHONPATH.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
from omero.rtypes import unwrap
from PIL import Image

from bridge.connectors.omero import script
from bridge.connectors.omero.core import parse_description
from bridge.connectors.omero.model import records_from_rois
from support.no_engine import ENGINE_MODULES
from support.omero_memory import ScriptOmero, point_roi
from support.omero_script_client import ScriptClient


def main(image: str, points: str, address: str, shell: str) -> dict:
    crop = np.asarray(Image.open(image).convert("RGB"))
    server = ScriptOmero()
    server.add_image(1, crop, name="slide")
    server.add_rois(1, [point_roi(*json.loads(Path(points).read_text()))])
    server.datasets[51] = [1]
    clicks = {p.shape_id: [p.click().x, p.click().y] for p in records_from_rois(server.rois[1])[0]}
    script.open_gateway = lambda client: server.connect()
    spec = importlib.util.spec_from_file_location("nuclick_omero_script_shell", shell)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    client = ScriptClient({"Data_Type": "Dataset", "IDs": [51], "NuClick_Server": address, "CSV_Report": True})
    module.run_script(client=client)
    ours = {}
    for roi in server.ours(1):
        (shape,) = roi.copyShapes()
        ours[parse_description(unwrap(roi.getDescription()))[0]] = unwrap(shape.getPoints())
    ann = client.outputs.get("File_Annotation")
    return {
        "message": unwrap(client.outputs["Message"]),
        "clicks": clicks,
        "ours": ours,
        "csv": server.csv_text(unwrap(ann.getValue().getId())) if ann else None,
        "engine_modules": sorted(m for m in sys.modules if m.partition(".")[0] in ENGINE_MODULES),
    }


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:5])))
