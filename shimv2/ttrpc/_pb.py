"""The generated protobuf messages the library needs, imported in one place.

protoc's Python output defines its classes dynamically, so without ``.pyi``
stubs mypy cannot see them; the ignores keep that to this file.
"""

from shimv2.api.google.rpc.status_pb2 import Status  # type: ignore[attr-defined]
from shimv2.api.ttrpc.request_pb2 import (  # type: ignore[attr-defined]
    KeyValue,
    Request,
    Response,
)

__all__ = ["KeyValue", "Request", "Response", "Status"]
