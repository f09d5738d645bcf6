"""The OpenAPI description of the HTTP API: valid OpenAPI 3.1, built from the
proto messages, and the copy in docs/ is what the server serves."""

from __future__ import annotations

import json
from pathlib import Path

from google.protobuf import json_format
from openapi_spec_validator import validate

from bridge.service.gen import nuclick_pb2 as pb
from bridge.service.openapi import openapi_document

DOCS_COPY = Path(__file__).resolve().parents[1] / "docs" / "openapi.json"


def test_the_document_is_valid_openapi_3_1():
    validate(openapi_document())


def test_the_docs_copy_is_the_served_document():
    assert json.loads(DOCS_COPY.read_text()) == openapi_document(), (
        "run: python -m bridge.service.openapi > docs/openapi.json"
    )


def test_every_message_field_is_described_under_its_json_name():
    schemas = openapi_document()["components"]["schemas"]
    for message in (pb.SegmentRequest, pb.SegmentResponse, pb.GetModelInfoResponse, pb.Tile, pb.Click, pb.Model):
        props = schemas[message.DESCRIPTOR.name]["properties"]
        assert set(props) == {f.json_name for f in message.DESCRIPTOR.fields}, message.DESCRIPTOR.name


def test_a_real_request_in_json_uses_only_described_fields():
    """What the gateway parses, json_format's output, fits the schema's names and types."""
    req = pb.SegmentRequest(request_id="a", model_name="lab")
    req.tile.width, req.tile.height, req.tile.data = 2, 2, b"\x00" * 12
    req.clicks.add(x=1.5, y=0.5, id="c", class_name="Tumor")
    doc = json.loads(json_format.MessageToJson(req))
    schemas = openapi_document()["components"]["schemas"]
    assert set(doc) <= set(schemas["SegmentRequest"]["properties"])
    assert set(doc["tile"]) <= set(schemas["Tile"]["properties"])
    assert schemas["Tile"]["properties"]["width"]["type"] == "integer"
    assert isinstance(doc["tile"]["data"], str)  # bytes travel as base64, as described
