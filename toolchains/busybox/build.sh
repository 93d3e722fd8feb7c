#!/usr/bin/env bash
# busybox recipe: a tiny toolchain root from Debian's busybox-static, built in seconds.
#
#   toolchains/busybox/build.sh --data DIR [--kiln BIN] [--rebuild] [--print-key]
#
# Prints the image's manifest digest (sha256:...) on stdout after importing it into
# the kiln data dir DIR. The root holds /bin/busybox, a symlink per applet (/bin/sh,
# /usr/bin/awk, ...), /etc/passwd and /etc/group with root and a uid/gid 1000 build
# user, /home/build, /tmp and empty /dev, /proc, /sys mount points. Needs the Debian
# package busybox-static. Cached by recipe (see ../recipe-lib.sh).
RECIPE_NAME=busybox
RECIPE_SCRIPT="$(readlink -f "${BASH_SOURCE[0]}")"
# shellcheck source=../recipe-lib.sh
. "$(dirname "$RECIPE_SCRIPT")/../recipe-lib.sh"
recipe_parse_args "$@"

BUSYBOX=${BUSYBOX:-/bin/busybox}
[ -x "$BUSYBOX" ] || recipe_die "$BUSYBOX not found: apt-get install busybox-static"
"$BUSYBOX" --list-full >/dev/null 2>&1 || recipe_die "$BUSYBOX has no --list-full (not busybox-static?)"
VERSION="$(dpkg-query -W -f='${Version}' busybox-static 2>/dev/null || echo unknown)"
TAG="$(echo "$VERSION" | tr -c 'A-Za-z0-9_.\n-' '_')"

build_root() {
  local root="$1"
  mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,root,home/build,tmp,dev,proc,sys}
  chmod 0700 "$root/root"
  chmod 1777 "$root/tmp"
  install -m 0755 "$BUSYBOX" "$root/bin/busybox"
  # One symlink to /bin/busybox per applet, at its full path (bin/sh, usr/bin/awk, ...):
  # busybox --install in a chroot does it in one process; without root, a loop.
  if [ "$(id -u)" = 0 ]; then
    chroot "$root" /bin/busybox --install -s
  else
    local applet
    for applet in $("$BUSYBOX" --list-full); do
      [ "$applet" = bin/busybox ] || ln -sf /bin/busybox "$root/$applet"
    done
  fi
  cat >"$root/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/bin/sh
build:x:1000:1000:build:/home/build:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
PASSWD
  cat >"$root/etc/group" <<'GROUP'
root:x:0:
build:x:1000:
nogroup:x:65534:
GROUP
  printf '127.0.0.1\tlocalhost\n::1\tlocalhost\n' >"$root/etc/hosts"
  chmod 0644 "$root"/etc/*
}

recipe_run "$(recipe_key "busybox $(sha256sum "$BUSYBOX" | cut -d' ' -f1)" "$VERSION")" build_root "kiln/busybox:$TAG"
