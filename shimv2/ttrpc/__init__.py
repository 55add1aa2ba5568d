"""A small ttrpc library for trio: sans-I/O framing, a server and a client.

Reusable on its own: it imports nothing from shimv2 but the generated
``ttrpc.Request``/``Response`` and ``google.rpc.Status`` messages.
"""

from .client import Client, ConnectionClosedError, connect
from .server import Method, RequestContext, Server
from .status import Code, TTRPCError

__all__ = [
    "Client",
    "Code",
    "ConnectionClosedError",
    "Method",
    "RequestContext",
    "Server",
    "TTRPCError",
    "connect",
]
