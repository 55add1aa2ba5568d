"""End-to-end tests: a private containerd + real runc, for both shims."""
