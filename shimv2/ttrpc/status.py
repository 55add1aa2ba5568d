"""gRPC status codes and the error carried as ``google.rpc.Status``.

The errdefs-style constructors produce the messages containerd's
``errdefs.FromGRPC`` expects: ``"<text>: <class text>"`` with the matching
code (spec/ttrpc.md §3), so containerd shows exactly the text we meant.
"""

from __future__ import annotations

from enum import IntEnum

from ._pb import Status

__all__ = [
    "Code",
    "TTRPCError",
    "already_exists",
    "deadline_exceeded",
    "error_from_exception",
    "failed_precondition",
    "invalid_argument",
    "not_found",
    "unavailable",
    "unimplemented",
    "unknown",
]


class Code(IntEnum):
    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class TTRPCError(Exception):
    """An RPC failure with a status code; raised by handlers and by the client."""

    def __init__(self, code: Code | int, message: str = "") -> None:
        try:
            self.code = Code(code)
        except ValueError:  # a code from the future: containerd would map it to unknown too
            self.code = Code.UNKNOWN
        self.message = message
        super().__init__(message)

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"TTRPCError({self.code.name}, {self.message!r})"

    def to_status(self) -> Status:
        return Status(code=int(self.code), message=self.message)

    @classmethod
    def from_status(cls, status: Status) -> TTRPCError:
        return cls(status.code, status.message)


def _classed(code: Code, class_text: str, text: str) -> TTRPCError:
    # errdefs.FromGRPC strips a trailing ": <class>" and re-appends it, so the
    # suffix must be there exactly once.
    if not text:
        message = class_text
    elif text == class_text or text.endswith(": " + class_text):
        message = text
    else:
        message = f"{text}: {class_text}"
    return TTRPCError(code, message)


def not_found(text: str) -> TTRPCError:
    return _classed(Code.NOT_FOUND, "not found", text)


def already_exists(text: str) -> TTRPCError:
    return _classed(Code.ALREADY_EXISTS, "already exists", text)


def invalid_argument(text: str) -> TTRPCError:
    return _classed(Code.INVALID_ARGUMENT, "invalid argument", text)


def failed_precondition(text: str) -> TTRPCError:
    return _classed(Code.FAILED_PRECONDITION, "failed precondition", text)


def unavailable(text: str) -> TTRPCError:
    return _classed(Code.UNAVAILABLE, "unavailable", text)


def unimplemented(text: str) -> TTRPCError:
    return _classed(Code.UNIMPLEMENTED, "not implemented", text)


def unknown(text: str) -> TTRPCError:
    return TTRPCError(Code.UNKNOWN, text)


def deadline_exceeded(text: str = "context deadline exceeded") -> TTRPCError:
    return TTRPCError(Code.DEADLINE_EXCEEDED, text)


def error_from_exception(exc: BaseException) -> TTRPCError:
    """Map a handler's exception the way Go's ``convertCode`` maps os errors."""
    if isinstance(exc, TTRPCError):
        return exc
    if isinstance(exc, FileNotFoundError):
        return TTRPCError(Code.NOT_FOUND, str(exc))
    if isinstance(exc, FileExistsError):
        return TTRPCError(Code.ALREADY_EXISTS, str(exc))
    if isinstance(exc, PermissionError):
        return TTRPCError(Code.PERMISSION_DENIED, str(exc))
    return TTRPCError(Code.UNKNOWN, str(exc) or type(exc).__name__)
