"""The runtime's layers, top to bottom, as ARCHITECTURE.md draws them.

A module imports only modules of the layers below its own, never one of its own
layer or above (tests/unit/test_layers.py reads this list and checks every
import, also those inside functions). Names are relative to ``shimv2``;
``__init__`` is the package itself and ``api`` covers the generated protobuf
modules. TOOLS are what people run beside the shim: no runtime module imports
them. Nothing at run time imports this module.
"""

LAYERS: tuple[tuple[str, ...], ...] = (
    ("cli", "launcher"),  # the shim binary's one top; the installer that builds it
    ("debugview",),  # the client of the binary's `debug` action
    ("forkserver",),  # gets what it runs from cli as callables
    ("manager",),  # start, delete, -info: the binary contract
    ("daemon",),
    ("debug", "shimlog"),
    ("service",),
    ("exits",),  # matches reaped exits to container processes
    ("container",),
    ("process",),
    ("console",),
    ("stdio", "runc", "events"),
    ("runccmd", "journal", "spool", "cgroups", "mount", "bootstrap"),
    ("cgroups.placement", "cgroups.v1", "cgroups.v2"),
    ("cgroups.paths",),
    ("cgroups.files", "cgroups.inotify"),
    ("bundle",),
    ("options", "ksm"),  # ksm: opt-in page merging of the daemons (PYSHIM_KSM)
    ("protowire", "reaper", "tasks", "tracing", "libc", "flags", "handoff"),
    ("ttrpc",),
    ("ttrpc.client", "ttrpc.server"),
    ("ttrpc.status", "ttrpc.wire"),
    ("ttrpc._pb",),
    ("api", "__init__", "layers"),  # generated protobuf; __version__; this list
)

TOOLS: tuple[str, ...] = (
    "tools",
    "stress",  # `python -m shimv2.stress`: forwards to tools.stress
)
