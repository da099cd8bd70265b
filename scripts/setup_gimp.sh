#!/usr/bin/env bash
# Builds (once) a Debian trixie chroot with GIMP 3.0 for the `gimp` tests, and a pre-warmed
# GIMP profile template inside it. Debian 12 only ships GIMP 2.10 (no Python plug-ins), and trixie
# packages must never go into a bookworm host (glibc), hence the chroot.
#
# Idempotent: a finished chroot is marked by a stamp file next to it and reused as is; a chroot
# without its stamp (an interrupted build) is deleted and rebuilt. Prints the chroot path last.
#
#   SDBRIDGE_CACHE   cache folder (default /var/cache/sdbridge); the chroot is $SDBRIDGE_CACHE/gimp-trixie
#   SDBRIDGE_MIRROR  Debian mirror URL (default: the host's own Debian mirror)
set -euo pipefail

CACHE=${SDBRIDGE_CACHE:-/var/cache/sdbridge}
ROOT=$CACHE/gimp-trixie
STAMP=$CACHE/gimp-trixie.ready
# Bumping this rebuilds every cached chroot (when the package list below changes).
RECIPE=2
# The profile template lives inside the chroot so tests copy it with a plain cp.
PROFILE_TEMPLATE=/opt/sdbridge/gimp-profile
PACKAGES=(gimp python3-gi gir1.2-gimp-3.0 gir1.2-gegl-0.4 xvfb xauth imagemagick)
APT=(apt-get -o DPkg::Lock::Timeout=900)

log() { printf 'setup_gimp: %s\n' "$*" >&2; }

if [[ $(id -u) != 0 ]]; then
    log "must run as root (debootstrap, chroot, mount)"
    exit 1
fi

if [[ -f $STAMP && $(cat "$STAMP") == "$RECIPE" && -x $ROOT/usr/bin/gimp-console-3.0 ]]; then
    log "reusing $ROOT"
    echo "$ROOT"
    exit 0
fi

host_mirror() {
    # The first non-security Debian URI of the host's apt sources (deb822 or one-line format).
    local uri=""
    if [[ -f /etc/apt/sources.list.d/debian.sources ]]; then
        uri=$(awk '/^URIs:/ { for (i = 2; i <= NF; i++) if ($i !~ /security/) { print $i; exit } }' \
            /etc/apt/sources.list.d/debian.sources)
    fi
    if [[ -z $uri && -f /etc/apt/sources.list ]]; then
        uri=$(awk '$1 == "deb" && $0 !~ /security/ { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; exit } }' \
            /etc/apt/sources.list)
    fi
    echo "${uri:-http://deb.debian.org/debian}"
}

host_version=$(cut -d. -f1 /etc/debian_version 2>/dev/null || true)
case $host_version in
    12 | 13 | trixie/sid | forky/sid) ;;
    *) log "untested host (/etc/debian_version: ${host_version:-none}); trying anyway" ;;
esac
MIRROR=${SDBRIDGE_MIRROR:-$(host_mirror)}
log "host Debian ${host_version:-?}, mirror $MIRROR, chroot $ROOT"

mkdir -p "$CACHE"
# One builder at a time (CI and a developer may start this together).
exec 9>"$CACHE/gimp-trixie.lock"
flock 9
if [[ -f $STAMP && $(cat "$STAMP") == "$RECIPE" ]]; then
    log "built meanwhile by another run: reusing $ROOT"
    echo "$ROOT"
    exit 0
fi

unmount_all() {
    # Everything mounted below the chroot, deepest first; lazy so a busy mount cannot block us.
    local m
    while read -r m; do
        umount -l "$m" || true
    done < <(awk -v r="$ROOT/" 'index($2, r) == 1 { print $2 }' /proc/mounts | sort -r)
}
trap unmount_all EXIT
trap 'exit 1' INT TERM HUP  # so that EXIT runs on Ctrl-C or a CI timeout as well

unmount_all
rm -f "$STAMP"
if [[ -e $ROOT ]]; then
    log "removing an unfinished or outdated chroot"
    rm -rf --one-file-system "$ROOT"
fi

if ! command -v debootstrap >/dev/null; then
    log "installing debootstrap on the host"
    DEBIAN_FRONTEND=noninteractive "${APT[@]}" install -y debootstrap ||
        { "${APT[@]}" update && DEBIAN_FRONTEND=noninteractive "${APT[@]}" install -y debootstrap; }
fi

start=$SECONDS
log "debootstrap trixie"
debootstrap --variant=minbase trixie "$ROOT" "$MIRROR" >"$CACHE/gimp-trixie.debootstrap.log" 2>&1 ||
    { tail -n 30 "$CACHE/gimp-trixie.debootstrap.log" >&2; exit 1; }
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
# No service may start inside the chroot during package installation.
printf '#!/bin/sh\nexit 101\n' >"$ROOT/usr/sbin/policy-rc.d"
chmod +x "$ROOT/usr/sbin/policy-rc.d"

mount -t proc proc "$ROOT/proc"
log "installing ${PACKAGES[*]}"
{
    chroot "$ROOT" "${APT[@]}" update &&
        chroot "$ROOT" env DEBIAN_FRONTEND=noninteractive "${APT[@]}" install -y \
            --no-install-recommends "${PACKAGES[@]}" &&
        chroot "$ROOT" apt-get clean
} >"$CACHE/gimp-trixie.apt.log" 2>&1 || { tail -n 30 "$CACHE/gimp-trixie.apt.log" >&2; exit 1; }

# A fresh profile costs 10-20 s at first start; tests copy this one instead.
log "pre-warming the GIMP profile template"
mkdir -p "$ROOT$PROFILE_TEMPLATE"
chroot "$ROOT" env HOME=/root GIMP3_DIRECTORY="$PROFILE_TEMPLATE" \
    timeout -k 10 300 gimp-console-3.0 -i -n --batch-interpreter python-fu-eval -b 'pass' --quit \
    >/dev/null 2>&1
[[ -f $ROOT$PROFILE_TEMPLATE/pluginrc ]] || { log "profile pre-warm failed"; exit 1; }

unmount_all
echo "$RECIPE" >"$STAMP"
log "ready in $((SECONDS - start)) s"
echo "$ROOT"
