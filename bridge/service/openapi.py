"""The OpenAPI 3.1 description of the HTTP/JSON gateway, built from the
``nuclick.v1`` messages themselves, so it cannot drift from the wire.

Schemas follow the proto3 JSON mapping that the gateway speaks
(``google.protobuf.json_format``): lowerCamelCase names, 64-bit integers as
strings, ``bytes`` as base64 strings, enums by name.  ``serve`` answers it at
``GET /openapi.json``; ``python -m bridge.service.openapi`` prints it (the
documentation site is built from that).
"""

from __future__ import annotations

import json
import sys
from typing import Any

from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor

from bridge.service.gen import nuclick_pb2 as pb

_SCALARS: dict[int, dict[str, Any]] = {
    FieldDescriptor.TYPE_DOUBLE: {"type": "number"},
    FieldDescriptor.TYPE_FLOAT: {"type": "number"},
    FieldDescriptor.TYPE_INT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_SINT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_SFIXED32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_UINT32: {"type": "integer", "format": "uint32"},
    FieldDescriptor.TYPE_FIXED32: {"type": "integer", "format": "uint32"},
    FieldDescriptor.TYPE_INT64: {"type": "string", "format": "int64"},
    FieldDescriptor.TYPE_SINT64: {"type": "string", "format": "int64"},
    FieldDescriptor.TYPE_SFIXED64: {"type": "string", "format": "int64"},
    FieldDescriptor.TYPE_UINT64: {"type": "string", "format": "uint64"},
    FieldDescriptor.TYPE_FIXED64: {"type": "string", "format": "uint64"},
    FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    FieldDescriptor.TYPE_STRING: {"type": "string"},
    FieldDescriptor.TYPE_BYTES: {"type": "string", "contentEncoding": "base64"},
}

ERROR = {
    "type": "object",
    "description": "Every error: the gRPC status name and the same message as over gRPC.",
    "properties": {
        "code": {"type": "string", "examples": ["INVALID_ARGUMENT", "UNAUTHENTICATED", "RESOURCE_EXHAUSTED"]},
        "message": {"type": "string"},
    },
    "required": ["code", "message"],
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _enum_schema(enum: EnumDescriptor) -> dict[str, Any]:
    return {"type": "string", "enum": [v.name for v in enum.values]}


def _field_schema(field: FieldDescriptor, schemas: dict[str, Any]) -> dict[str, Any]:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        _add_message(field.message_type, schemas)
        one: dict[str, Any] = _ref(field.message_type.name)
    elif field.type == FieldDescriptor.TYPE_ENUM:
        name = field.enum_type.full_name.removeprefix("nuclick.v1.").replace(".", "_")
        schemas.setdefault(name, _enum_schema(field.enum_type))
        one = _ref(name)
    else:
        one = dict(_SCALARS[field.type])
    repeated = getattr(field, "is_repeated", None)
    if repeated is None:  # protobuf before 5.29
        repeated = field.label == FieldDescriptor.LABEL_REPEATED
    return {"type": "array", "items": one} if repeated else one


def _add_message(message: Descriptor, schemas: dict[str, Any]) -> None:
    if message.name in schemas:
        return
    schemas[message.name] = {}  # placeholder: messages may refer to themselves
    props = {f.json_name: _field_schema(f, schemas) for f in message.fields}
    schemas[message.name] = {"type": "object", "properties": props, "additionalProperties": False}


def _json_body(name: str, media: str = "application/json") -> dict[str, Any]:
    return {"content": {media: {"schema": _ref(name)}}}


def _errors(*codes: int) -> dict[str, Any]:
    words = {
        400: "a request that is not valid (the message says why)",
        401: "a missing or wrong bearer token",
        408: "the request body did not arrive within the server's body deadline",
        411: "no Content-Length header",
        413: "a body, stream line or tile over the server's size limits",
        429: "the server's queue is full: retry after the Retry-After header's seconds",
        503: "the server is shutting down: retry, on another replica if there is one",
    }
    return {str(c): {"description": words[c], **_json_body("Error")} for c in codes}


def openapi_document() -> dict[str, Any]:
    """The gateway's routes and messages as an OpenAPI 3.1 document."""
    schemas: dict[str, Any] = {"Error": ERROR}
    for message in (pb.SegmentRequest, pb.SegmentResponse, pb.GetModelInfoResponse):
        _add_message(message.DESCRIPTOR, schemas)
    secured = [{"bearer": []}]
    common = (400, 401, 408, 411, 413, 429, 503)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "nuclick-bridge HTTP/JSON API",
            "version": pb.DESCRIPTOR.package,
            "description": (
                "One click inside a nucleus in, one polygon out. The same methods as the gRPC service "
                "nuclick.v1.NuClick, in the proto3 JSON mapping. Coordinates are level-0 image pixels."
            ),
        },
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "only when serve runs with a token"}
            },
        },
        "paths": {
            "/v1/segment": {
                "post": {
                    "summary": "Outline the nuclei under the clicks of one tile",
                    "operationId": "segment",
                    "security": secured,
                    "requestBody": {"required": True, **_json_body("SegmentRequest")},
                    "responses": {"200": {"description": "one result per click", **_json_body("SegmentResponse")}}
                    | _errors(*common),
                }
            },
            "/v1/segmentStream": {
                "post": {
                    "summary": "Many tiles in one call: one SegmentRequest per line (NDJSON)",
                    "description": (
                        "Answered as NDJSON in request order. A request that fails becomes a line with its "
                        "'error'; an error after the answer began ends the body with a line "
                        '{"error": {"code": ..., "message": ...}}. The size limit applies to each line.'
                    ),
                    "operationId": "segmentStream",
                    "security": secured,
                    "requestBody": {"required": True, **_json_body("SegmentRequest", "application/x-ndjson")},
                    "responses": {
                        "200": {
                            "description": "one SegmentResponse per line",
                            **_json_body("SegmentResponse", "application/x-ndjson"),
                        }
                    }
                    | _errors(*common),
                }
            },
            "/v1/model": {
                "get": {
                    "summary": "The served models, their pixel size and the server's limits",
                    "operationId": "getModelInfo",
                    "security": secured,
                    "responses": {"200": {"description": "the served models", **_json_body("GetModelInfoResponse")}}
                    | _errors(401, 503),
                }
            },
            "/healthz": {
                "get": {
                    "summary": "Whether this replica takes calls (no token)",
                    "operationId": "health",
                    "security": [],
                    "responses": {
                        "200": {"description": '{"status": "SERVING"}'},
                        "503": {"description": '{"status": "NOT_SERVING"}: shutting down'},
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics (needs the token; answers while draining)",
                    "operationId": "metrics",
                    "security": secured,
                    "responses": {"200": {"description": "Prometheus' text format", "content": {"text/plain": {}}}}
                    | _errors(401),
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document (no token)",
                    "operationId": "openapi",
                    "security": [],
                    "responses": {"200": {"description": "OpenAPI 3.1", "content": {"application/json": {}}}},
                }
            },
        },
    }


if __name__ == "__main__":
    json.dump(openapi_document(), sys.stdout, indent=2)
    sys.stdout.write("\n")
