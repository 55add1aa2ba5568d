#!/usr/bin/env bash
# make test-node: the tests marked `node` (pytest -m node) on a real node with
# systemd as PID 1, the unified cgroup v2 hierarchy, containerd 1.7 and Python
# 3.13: the Debian 13 VM of ../shared/vm (see its README.md), for both shims.
#
#   scripts/test-node.sh [PYTEST ARGS...]     e.g. -k cri, or -x
#
# Copies this working tree (tracked and untracked files, not what .gitignore
# names: no .venv) into a throwaway VM, builds the venv there (`make venv`,
# packages from the index) and runs pytest as root with PYSHIM_NODE=1 (the VM
# may be changed system-wide: the .deb is installed with apt-get). The VM runs
# under software emulation here, 10-30x slower than the host.
#
# Environment: PYSHIM_SHARED_DIR (default: <repo>/../shared), VM_* (vm-run.sh).
# Exit status: pytest's; 75 when there is no node (the VM could not be built or
# did not come up), so that CI can tell that apart from a failing test.
set -euo pipefail

die() { echo "test-node: error: $*" >&2; exit 2; }
# No node to test on (the VM could not be built or did not come up): EX_TEMPFAIL.
no_node() { echo "test-node: no node: $*" >&2; exit 75; }

# Inside the VM: build the venv and run the selection.
if [ "${1:-}" = "--guest" ]; then
    shift
    export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
    echo "test-node: guest $(uname -r), init $(cat /proc/1/comm)," \
        "cgroupfs $(stat -fc %T /sys/fs/cgroup), $(containerd --version | cut -d' ' -f3)," \
        "$(python3 --version)"
    [ -d /run/systemd/system ] || die "systemd is not running in the guest"
    [ "$(stat -fc %T /sys/fs/cgroup)" = cgroup2fs ] || die "the guest is not cgroup v2"
    start=$(date +%s)
    # No byte-compiling at install (emulated CPU): only what is imported gets compiled.
    PIP_NO_COMPILE=1 PIP_DISABLE_PIP_VERSION_CHECK=1 make venv PYTHON=python3 >/dev/null
    echo "test-node: venv built in $(($(date +%s) - start)) s"
    PYSHIM_NODE=1 exec .venv/bin/pytest -m node -rA --durations=10 -p no:cacheprovider \
        tests/unit/test_cgroups.py tests/e2e "$@"
fi

REPO=$(cd "$(dirname "$0")/.." && pwd)
SHARED=${PYSHIM_SHARED_DIR:-$(dirname "$REPO")/shared}
VM_RUN=$SHARED/vm/vm-run.sh
[ -f "$VM_RUN" ] || die "no $VM_RUN: make test-node needs the shared VM scripts in $SHARED/vm" \
    "(set PYSHIM_SHARED_DIR to the directory that holds vm/)"
# Builds the image on first use (qemu and debootstrap from apt, 2-6 min); a no-op
# when it is up to date.
bash "$SHARED/vm/build-vm.sh" || no_node "could not build the VM ($SHARED/vm/build-vm.sh)"
command -v git >/dev/null || die "git not found (it lists the files to copy)"

STAGE=$(mktemp -d "${TMPDIR:-/tmp}/pyshim-node.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
# The working tree as it is, edits included, minus ignored files (.venv, dist, caches).
git -C "$REPO" ls-files -z --cached --others --exclude-standard \
    | (cd "$REPO" && xargs -0 -r sh -c 'for f; do [ -e "$f" ] && printf "%s\0" "$f"; done' sh) \
    | tar -C "$REPO" --null -T - -cf - | tar -C "$STAGE" -xf -

start=$(date +%s)
rc=0
bash "$VM_RUN" -c "$STAGE" -- bash scripts/test-node.sh --guest "$@" || rc=$?
echo "test-node: exit $rc after $(($(date +%s) - start)) s (VM resume, copy, venv, tests)"
[ "$rc" -ne 255 ] || no_node "the VM did not come up (vm-run.sh exit 255)"
exit "$rc"
