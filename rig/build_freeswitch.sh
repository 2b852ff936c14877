#!/usr/bin/env bash
# Build the minimal FreeSWITCH 1.10.12 tree the ari-push rig runs, from the upstream release
# source tarballs, on Debian 12 (bookworm). About 15 minutes on two cores.
#
#   rig/build_freeswitch.sh SOURCES_DIR WORK_DIR OUT_TARBALL
#
# SOURCES_DIR holds three tarballs (any top-level directory name is fine):
#   freeswitch-*1.10.12*.tar.gz   FreeSWITCH, tag v1.10.12
#   sofia-sip-*1.13.17*.tar.gz    sofia-sip, tag v1.13.17 (Debian's 1.12 is too old)
#   spandsp-*.tar.gz              spandsp master reporting 3.0.0 (Debian's 0.0.6 is too old)
# If SOURCES_DIR has a SHA256SUMS file, the tarballs are checked against it first.
# OUT_TARBALL gets the stripped install tree as `freeswitch/` (bin, lib, mod, conf, share ...),
# about 3.4 MB, which runs relocated from wherever it is unpacked (see docs/freeswitch.md).
#
# Build dependencies (Debian 12):
#   apt-get install build-essential autoconf automake libtool libtool-bin pkg-config libssl-dev \
#     libcurl4-openssl-dev libpcre3-dev libspeexdsp-dev libspeex-dev libsqlite3-dev libedit-dev \
#     libtiff-dev libldns-dev uuid-dev zlib1g-dev libjpeg-dev yasm libsndfile1-dev
# Environment: JOBS (make -j, default: number of cores), NICE (default 10).
set -euo pipefail

if [ $# -ne 3 ]; then
  echo "usage: $0 SOURCES_DIR WORK_DIR OUT_TARBALL" >&2
  exit 2
fi
src=$(cd "$1" && pwd)
work=$2
out=$3
jobs=${JOBS:-$(nproc)}
nice=${NICE:-10}
mkdir -p "$work"
work=$(cd "$work" && pwd)
prefix=$work/prefix
logs=$work/logs

one() {  # the single tarball in $src matching a glob
  local matches=()
  for f in "$src"/$1; do [ -e "$f" ] && matches+=("$f"); done
  if [ ${#matches[@]} -ne 1 ]; then
    echo "need exactly one $1 in $src, found ${#matches[@]}" >&2
    exit 1
  fi
  echo "${matches[0]}"
}
fs_tgz=$(one 'freeswitch-*1.10.12*.tar.gz')
sofia_tgz=$(one 'sofia-sip-*.tar.gz')
spandsp_tgz=$(one 'spandsp-*.tar.gz')

if [ -f "$src/SHA256SUMS" ]; then
  for f in "$fs_tgz" "$sofia_tgz" "$spandsp_tgz"; do
    name=$(basename "$f")
    want=$(awk -v n="$name" '$2 == n || $2 == "*" n {print $1}' "$src/SHA256SUMS")
    if [ -n "$want" ]; then
      have=$(sha256sum "$f" | cut -d' ' -f1)
      if [ "$have" != "$want" ]; then
        echo "$name: sha256 $have does not match SHA256SUMS ($want)" >&2
        exit 1
      fi
    fi
  done
fi

step() {  # step NAME DIR CMD...: run in DIR, log to $logs/NAME.log, say how long it took
  local name=$1 dir=$2
  shift 2
  local t0
  t0=$(date +%s)
  echo "[build-freeswitch] $name ..." >&2
  if ! (cd "$dir" && nice -n "$nice" "$@") >"$logs/$name.log" 2>&1; then
    echo "[build-freeswitch] $name failed; last lines of $logs/$name.log:" >&2
    tail -20 "$logs/$name.log" >&2
    exit 1
  fi
  echo "[build-freeswitch] $name: $(($(date +%s) - t0)) s" >&2
}

rm -rf "$work/sofia-sip" "$work/spandsp" "$work/freeswitch" "$prefix" "$work/tree"
mkdir -p "$work/sofia-sip" "$work/spandsp" "$work/freeswitch" "$prefix" "$logs"
tar -xzf "$sofia_tgz" -C "$work/sofia-sip" --strip-components=1
tar -xzf "$spandsp_tgz" -C "$work/spandsp" --strip-components=1
tar -xzf "$fs_tgz" -C "$work/freeswitch" --strip-components=1

# sofia-sip and spandsp go into the same prefix; FreeSWITCH finds them through pkg-config.
step sofia-autogen "$work/sofia-sip" sh autogen.sh
step sofia-configure "$work/sofia-sip" ./configure --prefix="$prefix" --disable-static --without-doxygen
step sofia-make "$work/sofia-sip" make -j"$jobs"
step sofia-install "$work/sofia-sip" make install

step spandsp-bootstrap "$work/spandsp" ./bootstrap.sh
step spandsp-configure "$work/spandsp" ./configure --prefix="$prefix" --disable-static
step spandsp-make "$work/spandsp" make -j"$jobs"
step spandsp-install "$work/spandsp" make install

# Only the modules the rig and ari-push use: SIP, the event socket, the XML dialplan and the
# basic applications (park, bridge, answer, playback of tones), logging.
cat >"$work/freeswitch/modules.conf" <<'EOF'
applications/mod_commands
applications/mod_dptools
dialplans/mod_dialplan_xml
endpoints/mod_sofia
endpoints/mod_loopback
event_handlers/mod_event_socket
formats/mod_sndfile
formats/mod_tone_stream
loggers/mod_console
loggers/mod_logfile
EOF
export PKG_CONFIG_PATH=$prefix/lib/pkgconfig
step fs-bootstrap "$work/freeswitch" ./bootstrap.sh -j
# No --enable-optimization: it may add -march flags and make the tree unportable.
step fs-configure "$work/freeswitch" ./configure --prefix="$prefix" --disable-libvpx --disable-libyuv \
  --disable-debug --disable-fhs
step fs-make "$work/freeswitch" make -j"$jobs"
step fs-install "$work/freeswitch" make install

# The runnable tree: no headers, fonts, web pages or libtool archives; binaries stripped.
# libpcre.so.3 is carried along: newer Debian releases no longer ship it.
tree=$work/tree/freeswitch
mkdir -p "$work/tree"
cp -a "$prefix" "$tree"
rm -rf "$tree/include" "$tree/fonts" "$tree/htdocs" "$tree/lib/pkgconfig" "$tree/share/doc" "$tree/share/man" \
  "$tree/sounds" "$tree/grammar" "$tree/images"
find "$tree" -name '*.la' -delete
find "$tree" -name '*.a' -delete
for pcre in /usr/lib/x86_64-linux-gnu/libpcre.so.3 /lib/x86_64-linux-gnu/libpcre.so.3; do
  if [ -e "$pcre" ]; then cp -L "$pcre" "$tree/lib/libpcre.so.3"; break; fi
done
find "$tree/bin" "$tree/lib" "$tree/mod" -type f \( -perm -u+x -o -name '*.so*' \) -exec strip --strip-unneeded {} + \
  2>/dev/null || true
mkdir -p "$(dirname "$out")"
tar -czf "$out" -C "$work/tree" freeswitch
echo "[build-freeswitch] done: $out ($(du -h "$out" | cut -f1))" >&2
