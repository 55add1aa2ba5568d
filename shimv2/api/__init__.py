"""Generated protobuf modules (``make proto`` from proto/); never edit by hand.

The messages of containerd's Task, Events and bootstrap APIs, runc and cgroup
options and metrics, ttrpc's frames and google.rpc.Status: what crosses a
socket or a file containerd reads. Nothing else belongs here.
"""
