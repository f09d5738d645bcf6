"""The committed generated code is what the proto gives, and the client side
stays free of torch."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from bridge.service import protogen
from bridge.service.gen import GRPCIO_TOOLS_VERSION
from bridge.service.gen import nuclick_pb2 as pb

VERSION_LINES = re.compile(
    r"^(# Protobuf Python Version: .*|GRPC_GENERATED_VERSION = .*|\s+\d+,"
    r"|.*grpcio-tools \S+ *|GRPCIO_TOOLS_VERSION = .*)$",
    re.M,
)


def test_regenerating_the_code_gives_the_committed_files(tmp_path):
    written = protogen.generate(tmp_path)
    assert sorted(p.name for p in written) == sorted([*protogen.FILES, "__init__.py"])
    same_tools = protogen.tools_version() == GRPCIO_TOOLS_VERSION
    for path in written:
        fresh = path.read_text(encoding="utf-8")
        committed = (protogen.GEN / path.name).read_text(encoding="utf-8")
        if not same_tools:  # another grpcio-tools: only the version stamps may differ
            fresh, committed = VERSION_LINES.sub("", fresh), VERSION_LINES.sub("", committed)
        assert fresh == committed, f"{path.name} is stale: run 'make proto'"
    assert "from bridge.service.gen import nuclick_pb2" in (tmp_path / "nuclick_pb2_grpc.py").read_text()


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
