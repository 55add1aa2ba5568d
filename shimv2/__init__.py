"""pyshim: a containerd runtime v2 shim (io.containerd.pyshim.v2) in Python.

What belongs here is the runtime: the modules that run under every container,
from ``cli`` (the binary's one top) down to ``flags`` and the generated
``api``. shimv2/layers.py lists them top to bottom; a module imports only
layers below its own (tests/unit/test_layers.py). Subpackages:

- ``ttrpc``: the ttrpc library (sans-I/O wire codec, trio server and client);
  reusable on its own, it imports nothing else from here but ``api``.
- ``cgroups``: one interface over cgroup v1 and v2 (stats, OOM, placement).
- ``api``: generated protobuf messages; never edited by hand.
- ``tools``: what people run beside the shim (stress, a private containerd);
  the runtime never imports it.

Importing this package costs nothing: the ``start`` path reads ``__version__``.
"""

__version__ = "0.1.0"
