#!/bin/sh
# pyshim node installer: a self-contained virtualenv per release plus a link
# containerd finds on its PATH.
#
#   packaging/install.sh [WHEEL | SOURCE_DIR]     install / upgrade (default: this source tree)
#   packaging/install.sh --uninstall              remove the links and unused releases
#
# Environment:
#   PREFIX=/opt/pyshim       install root
#   BINDIR=/usr/local/bin    where the containerd-shim-pyshim-v2 link goes (must be on containerd's PATH)
#   PYTHON=/usr/bin/python3  interpreter the venv is built from (>= 3.11, with the venv module;
#                            Debian: apt-get install python3-venv). The venv links to it, so it
#                            must stay installed.
#   PIP_* variables are honoured by pip (e.g. PIP_INDEX_URL, PIP_FIND_LINKS, PIP_NO_INDEX).
#
# Layout:
#   $PREFIX/releases/<version>-<timestamp>/    one venv per install, never modified afterwards
#   $PREFIX/current -> releases/<...>          switched atomically (rename of a temp symlink)
#   $BINDIR/containerd-shim-pyshim-v2 -> $PREFIX/current/bin/containerd-shim-pyshim-v2
#
# Upgrades never touch files a running shim uses: the new release goes into a new
# directory, `current` is switched, and an old release is deleted only when no
# process runs from it any more (checked again on every install / --uninstall).
# Running it twice is harmless: every run ends with the same links and one
# current release.
set -eu

NAME=containerd-shim-pyshim-v2
PREFIX=${PREFIX:-/opt/pyshim}
BINDIR=${BINDIR:-/usr/local/bin}
HERE=$(cd "$(dirname "$0")" && pwd)

die() { echo "install.sh: error: $*" >&2; exit 1; }
say() { echo "install.sh: $*"; }

# 0 (true) if any process runs from / maps a file of directory $1
in_use() {
    _d=$1/
    for _p in /proc/[0-9]*; do
        # argv[0] of a shim is <release>/bin/python; extension modules show up in maps
        if grep -qasF -- "$_d" "$_p/cmdline" "$_p/maps" 2>/dev/null; then
            return 0
        fi
        _exe=$(readlink "$_p/exe" 2>/dev/null || true)
        case $_exe in "$_d"*) return 0 ;; esac
    done
    return 1
}

# stop the fork servers of release $1: they hold nothing (shims never depend on
# them) and would keep an old release "in use" until they time out
stop_fork_servers() {
    _d=$1/
    for _p in /proc/[0-9]*; do
        if grep -qasF -- "$_d" "$_p/cmdline" 2>/dev/null \
            && grep -qasF -- " forkserver " "$_p/cmdline" 2>/dev/null; then
            kill -TERM "${_p#/proc/}" 2>/dev/null || true
        fi
    done
    sleep 0.2
}

# delete releases other than $1 (a release dir name, may be empty) that no process uses
gc_releases() {
    _keep=$1
    [ -d "$PREFIX/releases" ] || return 0
    for _r in "$PREFIX"/releases/*; do
        [ -d "$_r" ] || continue
        [ "$(basename "$_r")" = "$_keep" ] && continue
        stop_fork_servers "$_r"
        if in_use "$_r"; then
            say "keeping $_r: still used by a running process (removed by a later install/--uninstall)"
        else
            rm -rf "$_r"
            say "removed old release $_r"
        fi
    done
}

# atomically make symlink $2 point to $1
atomic_link() {
    _tmp=$(dirname "$2")/.$(basename "$2").tmp.$$
    rm -f "$_tmp"
    ln -s "$1" "$_tmp"
    mv -Tf "$_tmp" "$2"
}

link_is_ours() {  # $BINDIR/$NAME is a symlink into $PREFIX
    [ -L "$BINDIR/$NAME" ] || return 1
    case $(readlink "$BINDIR/$NAME") in "$PREFIX"/*) return 0 ;; esac
    return 1
}

uninstall() {
    if link_is_ours; then
        rm -f "$BINDIR/$NAME"
        say "removed $BINDIR/$NAME"
    elif [ -e "$BINDIR/$NAME" ] || [ -L "$BINDIR/$NAME" ]; then
        say "leaving $BINDIR/$NAME alone: not a link into $PREFIX"
    fi
    rm -f "$PREFIX/current"
    gc_releases ""
    rmdir "$PREFIX/releases" "$PREFIX" 2>/dev/null || true
    exit 0
}

version_of() {  # version of wheel file / source dir $1
    case $1 in
        *.whl) basename "$1" | cut -d- -f2 ;;
        *) "$PYTHON" - "$1/pyproject.toml" <<'PY'
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    print(tomllib.load(f)["project"]["version"])
PY
        ;;
    esac
}

# ---------------------------------------------------------------- main
SRC=
case ${1:-} in
    --uninstall) uninstall ;;
    -h|--help) sed -n '2,/^set -eu/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) die "unknown option $1 (try --help)" ;;
    "") SRC=$(dirname "$HERE") ;;
    *) SRC=$1 ;;
esac
[ $# -le 1 ] || die "too many arguments"
[ -e "$SRC" ] || die "no such wheel or source dir: $SRC"
case $SRC in /*) ;; *) SRC=$(pwd)/$SRC ;; esac
if [ -d "$SRC" ] && [ ! -f "$SRC/pyproject.toml" ]; then
    die "$SRC has no pyproject.toml"
fi

if [ -z "${PYTHON:-}" ]; then
    if [ -x /usr/bin/python3 ]; then PYTHON=/usr/bin/python3; else PYTHON=$(command -v python3 || true); fi
fi
[ -n "$PYTHON" ] && [ -x "$PYTHON" ] || die "no python3 found (set PYTHON=)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "$PYTHON is older than 3.11"
"$PYTHON" -c 'import venv, ensurepip' 2>/dev/null \
    || die "$PYTHON lacks the venv/ensurepip modules (Debian: apt-get install python3-venv)"
if [ -e "$BINDIR/$NAME" ] || [ -L "$BINDIR/$NAME" ]; then
    link_is_ours || die "$BINDIR/$NAME exists and is not a link into $PREFIX; remove it first"
fi

VERSION=$(version_of "$SRC")
[ -n "$VERSION" ] || die "cannot tell the version of $SRC"
REL=$VERSION-$(date -u +%Y%m%d%H%M%S)
[ -e "$PREFIX/releases/$REL" ] && REL=$REL-$$
DEST=$PREFIX/releases/$REL

mkdir -p "$PREFIX/releases" "$BINDIR"
trap 'rm -rf "$DEST"' EXIT
say "building venv $DEST with $PYTHON"
"$PYTHON" -m venv "$DEST"
"$DEST/bin/python" -m pip install --quiet --disable-pip-version-check --no-input "$SRC"
# containerd runs the binary for every start and delete. The wheel brought the
# launcher pair; rebuild it for this venv (its exact paths, and the fork server
# version of its interpreter, which a wheel built elsewhere may not have): the
# native launcher when cc is found (CC=..., PYSHIM_NATIVE_LAUNCHER=0 to skip),
# else the Python one (-I -S) and a warning
"$DEST/bin/python" -I -m shimv2.launcher "$DEST/bin/$NAME"
"$DEST/bin/$NAME" -v >/dev/null || die "the installed $NAME does not run"
trap - EXIT

atomic_link "releases/$REL" "$PREFIX/current"
atomic_link "$PREFIX/current/bin/$NAME" "$BINDIR/$NAME"
say "installed pyshim $VERSION: $BINDIR/$NAME -> $PREFIX/current/bin/$NAME, current -> releases/$REL"
gc_releases "$REL"
