"""Runtime options: what arrives from containerd, reduced to what the shim uses.

Options come as a ``google.protobuf.Any`` of one of several types depending on
the client (spec: shim-contract.md §11): ``containerd.runc.v1.Options``,
the legacy ``containerd.linux.runc.CreateOptions`` / ``RuncOptions`` (other
field numbers!), or CRI's ``runtimeoptions.v1.Options`` pointing at a TOML
config. All are mapped onto one ``ShimOptions``, persisted as JSON in the
bundle for ``delete``. Protobuf is imported lazily: ``delete`` only reads JSON.
"""

from __future__ import annotations

import json
import logging
import os
import tomllib
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from shimv2.protowire import type_name

log = logging.getLogger(__name__)

DEFAULT_RUNC_ROOT = "/run/containerd/runc"

#: Output kept per stream while nobody reads its FIFO (shimv2.spool); 0: none, block.
DEFAULT_SPOOL_LIMIT = 64 << 20
#: Node-wide default for the spool limit (containerd's environment reaches the shim);
#: the ``SpoolLimitBytes`` runtime option overrides it per runtime.
SPOOL_LIMIT_ENV = "PYSHIM_SPOOL_LIMIT_BYTES"

RUNC_OPTIONS = "containerd.runc.v1.Options"
LEGACY_CREATE_OPTIONS = "containerd.linux.runc.CreateOptions"
LEGACY_RUNC_OPTIONS = "containerd.linux.runc.RuncOptions"
RUNTIME_OPTIONS = "runtimeoptions.v1.Options"

# TOML keys (Go field names of runc Options, matched case-insensitively) → our fields.
_TOML_KEYS = {
    "binaryname": "binary_name",
    "root": "root",
    "systemdcgroup": "systemd_cgroup",
    "nopivotroot": "no_pivot_root",
    "nonewkeyring": "no_new_keyring",
    "shimcgroup": "shim_cgroup",
    "iouid": "io_uid",
    "iogid": "io_gid",
    "criupath": "criu_path",
    "criuimagepath": "criu_image_path",
    "criuworkpath": "criu_work_path",
    "spoollimitbytes": "spool_limit_bytes",  # ours: no runc Options field
    "otelenv": "otel_env",  # ours: OTEL_* settings for shimv2.tracing, over the environment
}
_TOML_IGNORED = {"typeurl", "configpath"}


@dataclass
class ShimOptions:
    binary_name: str = ""
    root: str = ""
    # None: not given; a systemd cgroupsPath may decide (container.wants_systemd_cgroup).
    systemd_cgroup: bool | None = None
    no_pivot_root: bool = False
    no_new_keyring: bool = False
    shim_cgroup: str = ""
    io_uid: int = 0
    io_gid: int = 0
    criu_path: str = ""
    criu_image_path: str = ""
    criu_work_path: str = ""
    spool_limit_bytes: int = -1  # -1: $PYSHIM_SPOOL_LIMIT_BYTES, else DEFAULT_SPOOL_LIMIT
    otel_env: dict[str, str] = field(default_factory=dict)  # OTEL_* name -> value

    @property
    def runc_binary(self) -> str:
        return self.binary_name or "runc"

    @property
    def spool_limit(self) -> int:
        """Bytes of output spooled per stream while nobody reads (0: block instead)."""
        if self.spool_limit_bytes >= 0:
            return self.spool_limit_bytes
        text = os.environ.get(SPOOL_LIMIT_ENV, "").strip()
        if text:
            try:
                value = int(text)
            except ValueError:
                value = -1
            if value >= 0:
                return value
            log.warning("ignoring %s=%r: not a byte count", SPOOL_LIMIT_ENV, text)
        return DEFAULT_SPOOL_LIMIT

    def runc_root(self, namespace: str) -> str:
        return f"{self.root or DEFAULT_RUNC_ROOT}/{namespace}"

    def to_json(self) -> str:
        defaults = asdict(ShimOptions())
        # false and unset mean the same to `delete`: leave both out (Go's omitempty)
        return json.dumps(
            {
                k: v
                for k, v in asdict(self).items()
                if v != defaults[k] and v is not None and v is not False
            }
        )

    @classmethod
    def from_json(cls, text: str) -> ShimOptions:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("options must be a JSON object")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def from_toml(text: str) -> ShimOptions:
    options = ShimOptions()
    for key, value in tomllib.loads(text).items():
        norm = key.replace("_", "").lower()
        attr = _TOML_KEYS.get(norm)
        if attr is None:
            if norm not in _TOML_IGNORED:
                log.info("ignoring unknown runtime option %r", key)
            continue
        default = getattr(options, attr)
        expected = bool if default is None else type(default)
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise ValueError(f"runtime option {key!r} must be {expected.__name__}")
        if attr == "spool_limit_bytes" and value < 0:
            raise ValueError(f"runtime option {key!r} must not be negative")
        if isinstance(value, dict) and not all(
            k.startswith("OTEL_") and isinstance(v, str) for k, v in value.items()
        ):
            raise ValueError(f"runtime option {key!r} takes OTEL_* names with string values")
        setattr(options, attr, value)
    return options


def from_any(type_url: str, value: bytes) -> ShimOptions:
    """Decode options from an Any; absent or unknown types give the defaults.

    Raises ValueError for a payload of a known type that does not decode.
    """
    name = type_name(type_url)
    if not name:
        return ShimOptions()
    from google.protobuf.message import DecodeError

    try:
        if name == RUNC_OPTIONS:
            return _from_runc(value)
        if name == LEGACY_CREATE_OPTIONS:
            return _from_legacy_create(value)
        if name == LEGACY_RUNC_OPTIONS:
            return _from_legacy_runc(value)
        if name == RUNTIME_OPTIONS:
            return _from_runtime_options(value)
    except DecodeError as exc:
        raise ValueError(f"cannot decode {name}: {exc}") from exc
    log.warning("ignoring runtime options of unknown type %r", type_url)
    return ShimOptions()


def shim_cgroup_from_any(data: bytes) -> str:
    """The shim cgroup named in ``start``'s stdin (a serialized Any), without protobuf.

    Field numbers: Any{type_url=1, value=2}; runc Options shim_cgroup=3; legacy
    CreateOptions shim_cgroup=9; runtimeoptions config_path=2 / config_body=3
    (TOML with ``ShimCgroup``). Anything else (or nothing) names no cgroup.
    """
    from shimv2 import protowire

    envelope = protowire.fields(data)
    name = type_name(protowire.last_string(envelope, 1))
    value = protowire.fields(protowire.last_bytes(envelope, 2))
    if name == RUNC_OPTIONS:
        return protowire.last_string(value, 3)
    if name == LEGACY_CREATE_OPTIONS:
        return protowire.last_string(value, 9)
    if name == RUNTIME_OPTIONS:
        path = protowire.last_string(value, 2)
        if path:
            with open(path) as f:
                return from_toml(f.read()).shim_cgroup
        body = protowire.last_bytes(value, 3)
        return from_toml(body.decode()).shim_cgroup if body else ""
    return ""


CHECKPOINT_OPTIONS = "containerd.runc.v1.CheckpointOptions"
LEGACY_CHECKPOINT_OPTIONS = "containerd.linux.runc.CheckpointOptions"


def checkpoint_from_any(type_url: str, value: bytes) -> Any:
    """CheckpointOptions of either type (same field names; 8 and 9 are swapped
    between them, so decode by type URL). Absent → all defaults."""
    from google.protobuf.message import DecodeError

    from shimv2.api.containerd.linux.runctypes import runc_pb2
    from shimv2.api.containerd.runc.options import oci_pb2

    name = type_name(type_url)
    types: dict[str, Any] = {
        CHECKPOINT_OPTIONS: oci_pb2.CheckpointOptions,
        LEGACY_CHECKPOINT_OPTIONS: runc_pb2.CheckpointOptions,
    }
    if not name:
        return oci_pb2.CheckpointOptions()
    if name not in types:
        raise ValueError(f"unsupported checkpoint options type {type_url!r}")
    try:
        return types[name].FromString(value)
    except DecodeError as exc:
        raise ValueError(f"cannot decode {name}: {exc}") from exc


def _from_runc(value: bytes) -> ShimOptions:
    from shimv2.api.containerd.runc.options import oci_pb2

    o: Any = oci_pb2.Options.FromString(value)
    return ShimOptions(
        binary_name=o.binary_name,
        root=o.root,
        systemd_cgroup=o.systemd_cgroup or None,  # proto3: false is never on the wire
        no_pivot_root=o.no_pivot_root,
        no_new_keyring=o.no_new_keyring,
        shim_cgroup=o.shim_cgroup,
        io_uid=o.io_uid,
        io_gid=o.io_gid,
        criu_path=o.criu_path,
        criu_image_path=o.criu_image_path,
        criu_work_path=o.criu_work_path,
    )


def _from_legacy_create(value: bytes) -> ShimOptions:
    from shimv2.api.containerd.linux.runctypes import runc_pb2

    o: Any = runc_pb2.CreateOptions.FromString(value)
    return ShimOptions(
        no_pivot_root=o.no_pivot_root,
        no_new_keyring=o.no_new_keyring,
        shim_cgroup=o.shim_cgroup,
        io_uid=o.io_uid,
        io_gid=o.io_gid,
        criu_image_path=o.criu_image_path,
        criu_work_path=o.criu_work_path,
    )


def _from_legacy_runc(value: bytes) -> ShimOptions:
    from shimv2.api.containerd.linux.runctypes import runc_pb2

    o: Any = runc_pb2.RuncOptions.FromString(value)
    return ShimOptions(
        binary_name=o.runtime,
        root=o.runtime_root,
        criu_path=o.criu_path,
        systemd_cgroup=o.systemd_cgroup or None,
    )


def _from_runtime_options(value: bytes) -> ShimOptions:
    from shimv2.api.runtimeoptions.v1 import api_pb2

    o: Any = api_pb2.Options.FromString(value)
    if o.config_path:
        try:
            with open(o.config_path) as f:
                return from_toml(f.read())
        except OSError as exc:
            raise ValueError(f"cannot read runtime config {o.config_path}: {exc}") from exc
    if o.config_body:
        return from_toml(o.config_body.decode())
    return ShimOptions()
