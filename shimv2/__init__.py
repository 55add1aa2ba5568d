"""pyshim: a containerd runtime v2 shim (io.containerd.pyshim.v2) in Python."""

__version__ = "0.1.0"
