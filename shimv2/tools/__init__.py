"""What people run beside the shim; the runtime never imports it.

- ``python -m shimv2.tools.stress`` (also ``python -m shimv2.stress``): kill
  containerd and shims again and again, and check that nothing was lost.
- `shimv2.tools.containerd`: a private containerd (own root, state, sockets)
  for the end-to-end tests, the demo, the benchmarks and the stress tool.

tests/unit/test_layers.py checks that no runtime module imports from here; the
client of the binary's ``debug`` action is shimv2.debugview, part of the runtime.
"""
