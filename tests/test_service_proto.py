"""The committed generated code is what the proto gives, and the client side
stays free of torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bridge.service import protogen
from bridge.service.gen import GRPCIO_TOOLS_VERSION
from bridge.service.gen import nuclick_pb2 as pb


def test_regenerating_the_code_gives_the_committed_files(tmp_path):
    """Exactly what ``make proto`` (``python -m bridge.service.protogen``) writes,
    byte for byte.  The output depends on the grpcio-tools version, so the
    test extras pin the one the committed files record."""
    assert protogen.tools_version() == GRPCIO_TOOLS_VERSION, (
        f"grpcio-tools {protogen.tools_version()} is installed but bridge/service/gen was generated with "
        f"{GRPCIO_TOOLS_VERSION}: pip install grpcio-tools=={GRPCIO_TOOLS_VERSION} (the test extras pin it), "
        "or run 'make proto' and commit the result when upgrading"
    )
    out = tmp_path / "gen"
    done = subprocess.run(
        [sys.executable, "-m", "bridge.service.protogen", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    fresh = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    committed = {name: (protogen.GEN / name).read_bytes() for name in [*protogen.FILES, "__init__.py"]}
    assert sorted(fresh) == sorted(committed)
    for name, data in committed.items():
        assert fresh[name] == data, f"bridge/service/gen/{name} is stale: run 'make proto'"
    assert b"from bridge.service.gen import nuclick_pb2" in fresh["nuclick_pb2_grpc.py"]
    committed_files = {p.name for p in protogen.GEN.iterdir() if p.is_file()}
    assert committed_files == set(committed), "bridge/service/gen holds files make proto does not write"


def test_the_contract_names_what_the_issue_promises():
    service = pb.DESCRIPTOR.services_by_name["NuClick"]
    assert service.full_name == "nuclick.v1.NuClick"
    methods = {m.name: (m.client_streaming, m.server_streaming) for m in service.methods}
    assert methods == {"Segment": (False, False), "SegmentStream": (True, True), "GetModelInfo": (False, False)}
    assert pb.DESCRIPTOR.name == "nuclick/v1/nuclick.proto"
    assert (Path(protogen.PROTO_ROOT) / protogen.PROTO).is_file()


def test_the_client_and_the_wire_types_do_not_import_torch():
    code = (
        "import sys\n"
        "import bridge.client, bridge.service.convert, bridge.service.gen.nuclick_pb2_grpc\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not bad, bad[:5]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
