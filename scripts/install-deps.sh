#!/usr/bin/env bash
# Install the system packages pyshim's tests and demo need (Debian/Ubuntu).
#
# Idempotent: apt is only touched when something is missing.
#   containerd, ctr, runc, busybox  -> apt-get install containerd runc busybox-static
#   python3 -m venv does not work   -> apt-get install python3 python3-venv
#   cc (native launcher)            -> apt-get install gcc libc6-dev
# Runs non-interactively (fine with CI=true and no stdin). Needs root, or sudo.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
# runc lives in /usr/sbin, which a non-login PATH may lack
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

log() { printf 'install-deps: %s\n' "$*" >&2; }

need_pkgs=()

missing_tools=()
for tool in containerd ctr runc busybox; do
    command -v "$tool" >/dev/null 2>&1 || missing_tools+=("$tool")
done
if ((${#missing_tools[@]})); then
    log "missing: ${missing_tools[*]}"
    need_pkgs+=(containerd runc busybox-static)
fi

venv_ok() {
    local tmp rc=0
    command -v python3 >/dev/null 2>&1 || return 1
    tmp="$(mktemp -d)"
    python3 -m venv "$tmp/v" >/dev/null 2>&1 || rc=1
    rm -rf "$tmp"
    return "$rc"
}
if ! venv_ok; then
    log "python3 -m venv does not work"
    need_pkgs+=(python3 python3-venv)
fi
# The native launcher (shimv2/launcher.c) is compiled when the venv is built.
if ! command -v cc >/dev/null 2>&1 || [ ! -f /usr/include/stdio.h ]; then
    log "no C compiler (for the native launcher)"
    need_pkgs+=(gcc libc6-dev)
fi
# packaging/ builds its venvs from Debian's own python3 (the .deb's target).
if ! /usr/bin/python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
    log "/usr/bin/python3 lacks venv"
    need_pkgs+=(python3 python3-venv)
fi

if ((${#need_pkgs[@]} == 0)); then
    log "all dependencies present"
    exit 0
fi

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo -n)
    else
        log "need root to install: ${need_pkgs[*]}"
        exit 1
    fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
    log "no apt-get; install these by hand: ${need_pkgs[*]}"
    exit 1
fi

log "installing: ${need_pkgs[*]}"
"${SUDO[@]}" apt-get update </dev/null
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
    "${need_pkgs[@]}" </dev/null

for tool in containerd ctr runc busybox; do
    command -v "$tool" >/dev/null 2>&1 || { log "still missing after install: $tool"; exit 1; }
done
venv_ok || { log "python3 -m venv still broken after install"; exit 1; }
log "done"
