#!/bin/sh
# Build dist/pyshim_<version>_<arch>.deb with dpkg-deb from this source tree
# (or from a given wheel). Needs no root and does not touch /opt: the venv is
# built in a staging dir and its absolute paths are rewritten afterwards.
#
#   packaging/build-deb.sh [WHEEL]
#
# Environment: PYTHON (default /usr/bin/python3), OUT (default <repo>/dist),
# DEB_VERSION (package version and release dir name; default: the project
# version, e.g. 0.1.0 -> set 0.1.0-2 for a packaging-only revision),
# PIP_* (honoured by pip).
#
# Package layout:
#   /opt/pyshim/releases/<version>/     the venv (bin/python -> /usr/bin/python3)
#   /opt/pyshim/current -> releases/<version>
#   /usr/bin/containerd-shim-pyshim-v2 -> /opt/pyshim/current/bin/containerd-shim-pyshim-v2
#
# Constraint: the venv is not self-contained with respect to the interpreter: it
# runs the TARGET's /usr/bin/python3 and its packages live in lib/python3.X.
# Build with the same Debian python3 (same minor version) as the target release,
# i.e. on the target distribution (Debian bookworm: 3.11); the Depends line pins
# python3 to that minor version. Compiled dependencies (psutil, protobuf's upb)
# come from manylinux wheels for the build machine's architecture.
set -eu

NAME=containerd-shim-pyshim-v2
HERE=$(cd "$(dirname "$0")" && pwd)
TOP=$(dirname "$HERE")
PYTHON=${PYTHON:-/usr/bin/python3}
OUT=${OUT:-$TOP/dist}
SRC=${1:-$TOP}
case $SRC in /*) ;; *) SRC=$(pwd)/$SRC ;; esac

die() { echo "build-deb.sh: error: $*" >&2; exit 1; }
command -v dpkg-deb >/dev/null || die "dpkg-deb not found"
[ -x "$PYTHON" ] || die "$PYTHON not found"
"$PYTHON" -c 'import venv, ensurepip' 2>/dev/null \
    || die "$PYTHON lacks venv/ensurepip (Debian: apt-get install python3-venv)"

case $SRC in
    *.whl) VERSION=$(basename "$SRC" | cut -d- -f2) ;;
    *) VERSION=$("$PYTHON" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' "$SRC/pyproject.toml") ;;
esac
VERSION=${DEB_VERSION:-$VERSION}
ARCH=$(dpkg --print-architecture)
PYMINOR=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
PYNEXT=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1] + 1}")')
REL=/opt/pyshim/releases/$VERSION

WORK=$(mktemp -d "${TMPDIR:-/tmp}/pyshim-deb.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
STAGE=$WORK/root
DEST=$STAGE$REL

echo "build-deb.sh: building venv for $REL with $PYTHON ($PYMINOR)"
"$PYTHON" -m venv "$DEST"
"$DEST/bin/python" -m pip install --quiet --disable-pip-version-check --no-input --no-compile "$SRC"
# containerd runs the binary for every start and delete: the native launcher
# (shimv2/launcher.c; needs cc here, not on the target) or else the Python one
# (-I -S). The wheel brought one; rebuilt here for this venv's interpreter. The
# native one names no path: it runs <its real path>.py, and the fork server
# version compiled in has no paths either, so it survives relocation.
"$DEST/bin/python" -I -m shimv2.launcher "$DEST/bin/$NAME"
SCRIPT=$DEST/bin/$NAME
if [ -f "$SCRIPT.py" ]; then
    SCRIPT=$SCRIPT.py
else
    echo "build-deb.sh: warning: no C compiler, the package gets the slower Python launcher" >&2
fi
# the runtime needs neither pip nor setuptools
"$DEST/bin/python" -m pip uninstall --quiet --yes pip setuptools >/dev/null 2>&1 || true
rm -rf "$DEST/bin/pip" "$DEST/bin/pip3" "$DEST/bin/pip$PYMINOR"
# relocate: shebangs, activate scripts and pyvenv.cfg name the staging dir
grep -rlI --null -F -- "$STAGE" "$DEST" | xargs -0 -r sed -i "s|$STAGE||g"
if grep -rlI -F -- "$STAGE" "$DEST"; then die "staging path left in the files above"; fi
head -1 "$SCRIPT" | grep -qx "#!$REL/bin/python -IS" || die "unexpected shebang in $SCRIPT"
# byte-compile with the final paths so Python never writes into /opt at run time
"$PYTHON" -m compileall -q -j0 -s "$STAGE" -p / "$DEST/lib" >/dev/null
find "$STAGE" -name '*.pyc' -path "*__pycache__*" | head -1 | grep -q . || die "compileall produced nothing"

ln -s "releases/$VERSION" "$STAGE/opt/pyshim/current"
mkdir -p "$STAGE/usr/bin" "$STAGE/usr/share/doc/pyshim"
ln -s "/opt/pyshim/current/bin/$NAME" "$STAGE/usr/bin/$NAME"
cp "$HERE/containerd-config.toml" "$HERE/containerd-config-v3.toml" "$HERE/runtimeclass.yaml" \
    "$STAGE/usr/share/doc/pyshim/"
[ -f "$TOP/README.md" ] && cp "$TOP/README.md" "$STAGE/usr/share/doc/pyshim/"

mkdir -p "$STAGE/DEBIAN"
SIZE=$(du -sk --exclude=DEBIAN "$STAGE" | cut -f1)
cat > "$STAGE/DEBIAN/control" <<CTRL
Package: pyshim
Version: $VERSION
Architecture: $ARCH
Maintainer: pyshim developers <pyshim@localhost>
Installed-Size: $SIZE
Depends: python3 (>= $PYMINOR), python3 (<< $PYNEXT), runc, containerd
Section: admin
Priority: optional
Description: containerd shim v2 written in Python (io.containerd.pyshim.v2)
 pyshim is the program containerd starts for every container whose runtime
 is io.containerd.pyshim.v2. It serves containerd's Task API over ttrpc and
 drives runc. Installs a self-contained virtualenv under /opt/pyshim and
 /usr/bin/$NAME. CRI snippets for containerd config version 2 and 3 and a
 Kubernetes RuntimeClass are in /usr/share/doc/pyshim/.
CTRL

# shell functions shared by the maintainer scripts (DPKG_ROOT-aware)
COMMON=$(cat <<'SH'
R=${DPKG_ROOT:-}
RELS=$R/opt/pyshim/releases
NEW=@VERSION@
# 0 (true) if a process runs from / maps a file of directory $1
in_use() {
    for _p in /proc/[0-9]*; do
        if grep -qasF -- "$1/" "$_p/cmdline" "$_p/maps" 2>/dev/null; then return 0; fi
    done
    return 1
}
# fork servers of an old release hold nothing (shims never depend on them): stop
# them rather than keep their release alive until they time out
stop_fork_servers() {
    for _p in /proc/[0-9]*; do
        if grep -qasF -- "$1/" "$_p/cmdline" 2>/dev/null \
            && grep -qasF -- " forkserver " "$_p/cmdline" 2>/dev/null; then
            kill -TERM "${_p#/proc/}" 2>/dev/null || true
        fi
    done
    sleep 0.2
}
# dpkg deletes the files of the old version on upgrade/remove: keep hard links of
# every release a running shim uses, restored by restore_kept
keep_in_use() {
    [ -d "$RELS" ] || return 0
    for _r in "$RELS"/*; do
        [ -d "$_r" ] || continue
        _n=$(basename "$_r")
        [ "$_n" = "$1" ] && continue
        stop_fork_servers "$_r"
        if [ ! -e "$RELS/.keep-$_n" ] && in_use "$_r"; then
            cp -al "$_r" "$RELS/.keep-$_n"
        fi
    done
}
restore_kept() {
    [ -d "$RELS" ] || return 0
    for _k in "$RELS"/.keep-*; do
        [ -d "$_k" ] || continue
        _n=${_k##*/.keep-}
        if [ ! -e "$RELS/$_n" ]; then mv "$_k" "$RELS/$_n"; else rm -rf "$_k"; fi
    done
}
# remove releases other than $1 that no process uses any more
gc_releases() {
    [ -d "$RELS" ] || return 0
    for _r in "$RELS"/*; do
        [ -d "$_r" ] || continue
        [ "$(basename "$_r")" = "$1" ] && continue
        stop_fork_servers "$_r"
        if in_use "$_r"; then
            echo "pyshim: keeping $_r, still used by running shims" >&2
        else
            rm -rf "$_r"
        fi
    done
}
SH
)
COMMON=$(printf '%s\n' "$COMMON" | sed "s|@VERSION@|$VERSION|")

cat > "$STAGE/DEBIAN/preinst" <<EOF2
#!/bin/sh
set -e
$COMMON
case "\$1" in
    upgrade|install) keep_in_use "\$NEW" ;;
esac
exit 0
EOF2

cat > "$STAGE/DEBIAN/postinst" <<EOF2
#!/bin/sh
set -e
$COMMON
case "\$1" in
    configure)
        restore_kept
        # (re)point current at this release atomically: rename of a temp symlink
        ln -sfn "releases/\$NEW" "\$R/opt/pyshim/.current.tmp"
        mv -Tf "\$R/opt/pyshim/.current.tmp" "\$R/opt/pyshim/current"
        gc_releases "\$NEW"
        ;;
esac
exit 0
EOF2

cat > "$STAGE/DEBIAN/prerm" <<EOF2
#!/bin/sh
set -e
$COMMON
case "\$1" in
    remove|deconfigure) keep_in_use "" ;;
esac
exit 0
EOF2

cat > "$STAGE/DEBIAN/postrm" <<EOF2
#!/bin/sh
set -e
$COMMON
case "\$1" in
    remove|purge)
        # dpkg removed its own files and links; drop what we created
        restore_kept
        rm -f "\$R/opt/pyshim/.current.tmp"
        gc_releases ""
        rmdir "\$RELS" "\$R/opt/pyshim" 2>/dev/null || true
        ;;
    abort-install|abort-upgrade)
        restore_kept
        ;;
esac
exit 0
EOF2
chmod 0755 "$STAGE/DEBIAN/preinst" "$STAGE/DEBIAN/postinst" "$STAGE/DEBIAN/prerm" "$STAGE/DEBIAN/postrm"
for s in preinst postinst prerm postrm; do sh -n "$STAGE/DEBIAN/$s"; done

mkdir -p "$OUT"
DEB=$OUT/pyshim_${VERSION}_$ARCH.deb
dpkg-deb --root-owner-group -Zgzip --build "$STAGE" "$DEB" >/dev/null
echo "build-deb.sh: built $DEB"
