#!/bin/sh
# Installs what the Krita tests (pytest -m krita) need: Krita 5 from Debian, PyQt5 for its
# Python, and Xvfb because Krita's GUI refuses the offscreen platform. Idempotent: a machine
# that already has them costs one dpkg query.
set -eu
PACKAGES="krita python3-pyqt5 python3-sip xvfb xauth"
missing=""
for p in $PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" \
        || missing="$missing $p"
done
if [ -z "$missing" ]; then
    echo "setup_krita: all present"
    exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get -o DPkg::Lock::Timeout=900 update
# shellcheck disable=SC2086  # word splitting of the package list is intended
DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=900 install -y \
    --no-install-recommends $missing
