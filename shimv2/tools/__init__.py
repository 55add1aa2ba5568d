"""Developer and operator tooling that ships with pyshim but is not the shim.

Nothing here is imported by the shim binary (``shimv2.cli``) but the client
of its ``debug`` action (`shimv2.devtools.debugview`), never by the daemon: these modules
start their own private containerd (`shimv2.devtools.containerd`) for the
end-to-end tests, the demo, the benchmarks and ``python -m shimv2.stress``.
"""
