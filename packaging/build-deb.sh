#!/usr/bin/env bash
# Builds barngate's Debian packages:
#
#   packaging/build-deb.sh [amd64|arm64|all]      (default: amd64)
#
# amd64: `cargo build --release --no-default-features --features mimalloc`
# (the shipped features: mimalloc, no device simulator) with the toolchain on
# PATH; arm64: the same release build cross-compiled with Debian's own toolchain
# (packaging/install-cross-toolchain.sh installs it, packaging/cross-env.sh
# sets it up). The packages land in target/debian/ (or $BARNGATE_DEB_OUT):
#   barngate_<version>_<arch>.deb
#
# Contents: /usr/bin/barngate, the systemd unit (systemd/barngate.service),
# the config template as the conffile /etc/barngate/barngate.toml, a man page
# made from --help by help2man, the README and copyright under
# /usr/share/doc/barngate; maintainer scripts in packaging/debian/ (the
# barngate system user, /var/lib/barngate 0700, service enabled and started;
# `remove` keeps the data, `purge` deletes it).
#
# Plain dpkg-deb rather than cargo-deb: nothing to compile before the first
# package (cargo-deb is a crate of its own to build, minutes on 2 cores), and
# the maintainer scripts are ours either way.
#
# Environment:
#   BARNGATE_BIN=PATH        package this binary instead of building (one arch only)
#   BARNGATE_DEB_PROFILE=P   cargo profile to build (default: release)
#   BARNGATE_DEB_VERSION=V   package version (default: Cargo.toml's version)
#   BARNGATE_DEB_OUT=DIR     output directory (default: <target dir>/debian)
#   BARNGATE_DEB_COMPRESS=C  dpkg-deb compressor: xz (default) or gzip (faster,
#                            for packages that only a test installs)
#   BARNGATE_CROSS_TARGET_DIR=DIR  target dir of the cross build
#                            (default: <target dir>/debian-cross)
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."

stages=()
cleanup() { [ ${#stages[@]} -eq 0 ] || rm -rf "${stages[@]}"; }
trap cleanup EXIT

arches=()
case "${1:-amd64}" in
  amd64) arches=(amd64) ;;
  arm64) arches=(arm64) ;;
  all) arches=(amd64 arm64) ;;
  *) echo "usage: $0 [amd64|arm64|all]" >&2; exit 2 ;;
esac
if [ -n "${BARNGATE_BIN:-}" ] && [ ${#arches[@]} -ne 1 ]; then
  echo "build-deb: BARNGATE_BIN names one binary: build one architecture at a time" >&2
  exit 2
fi

profile=${BARNGATE_DEB_PROFILE:-release}
native_target_dir=${CARGO_TARGET_DIR:-target}
out=${BARNGATE_DEB_OUT:-$native_target_dir/debian}
mkdir -p "$out"
out=$(cd "$out" && pwd)
version=${BARNGATE_DEB_VERSION:-$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)}
[ -n "$version" ] || { echo "build-deb: no version in Cargo.toml" >&2; exit 1; }

if ! command -v help2man >/dev/null; then
  if [ "$(id -u)" -eq 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends help2man \
      || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends help2man; }
  else
    echo "build-deb: help2man is missing (sudo apt-get install help2man)" >&2
    exit 1
  fi
fi

# The shipped features: the mimalloc allocator, without the `simulator`
# feature (a developer tool).
features=(--no-default-features --features mimalloc)

# The binary for one architecture: built here unless BARNGATE_BIN names it.
binary_for() {
  local arch=$1
  if [ -n "${BARNGATE_BIN:-}" ]; then
    echo "$BARNGATE_BIN"
    return
  fi
  case "$arch" in
    amd64)
      echo "build-deb: cargo build --profile $profile ${features[*]} (amd64)" >&2
      cargo build --locked --profile "$profile" "${features[@]}" --bin barngate >&2
      echo "$native_target_dir/$profile/barngate"
      ;;
    arm64)
      bash packaging/install-cross-toolchain.sh >&2
      (
        # shellcheck source=packaging/cross-env.sh
        . packaging/cross-env.sh
        echo "build-deb: $CROSS_CARGO build --profile $profile ${features[*]} --target $CROSS_TARGET (arm64)" >&2
        "$CROSS_CARGO" build --locked --profile "$profile" "${features[@]}" --target "$CROSS_TARGET" --bin barngate >&2
        echo "$CARGO_TARGET_DIR/$CROSS_TARGET/$profile/barngate"
      )
      ;;
  esac
}

build_one() {
  local arch=$1 bin machine strip runner
  case "$arch" in
    amd64) machine="Advanced Micro Devices X86-64"; strip=strip; runner="" ;;
    arm64) machine="AArch64"; strip=aarch64-linux-gnu-strip; runner=qemu-aarch64-static ;;
  esac
  bin=$(binary_for "$arch")
  [ -x "$bin" ] || { echo "build-deb: no binary at $bin" >&2; exit 1; }
  if ! readelf -h "$bin" | grep -q "Machine:.*$machine"; then
    echo "build-deb: $bin is not an $arch binary" >&2
    exit 1
  fi

  local stage
  stage=$(mktemp -d)
  stages+=("$stage")
  local pkg=$stage/pkg
  install -d -m 0755 "$pkg/DEBIAN" "$pkg/usr/bin" "$pkg/lib/systemd/system" \
    "$pkg/etc/barngate" "$pkg/usr/share/man/man1" "$pkg/usr/share/doc/barngate"

  install -m 0755 "$bin" "$pkg/usr/bin/barngate"
  if command -v "$strip" >/dev/null; then
    "$strip" --strip-unneeded "$pkg/usr/bin/barngate"
  fi
  install -m 0644 systemd/barngate.service "$pkg/lib/systemd/system/barngate.service"
  install -m 0640 config/barngate.toml "$pkg/etc/barngate/barngate.toml"
  gzip -9n < README.md > "$pkg/usr/share/doc/barngate/README.md.gz"
  install -m 0644 packaging/debian/copyright "$pkg/usr/share/doc/barngate/copyright"

  # The man page, from the binary's own --help (each command's too). An arm64
  # binary runs under qemu-user where it cannot run natively.
  local exe=$stage/barngate
  if [ -n "$runner" ] && ! "$pkg/usr/bin/barngate" --version >/dev/null 2>&1; then
    command -v "$runner" >/dev/null || { echo "build-deb: $runner is needed to run the $arch binary for its man page" >&2; exit 1; }
    printf '#!/bin/sh\nexec %s %q "$@"\n' "$runner" "$pkg/usr/bin/barngate" > "$exe"
  else
    printf '#!/bin/sh\nexec %q "$@"\n' "$pkg/usr/bin/barngate" > "$exe"
  fi
  chmod +x "$exe"
  local h2m=$stage/barngate.h2m
  cp packaging/debian/barngate.h2m "$h2m"
  {
    echo "[COMMANDS]"
    "$exe" --help | sed -n '/^Commands:/,/^$/p' | awk 'NR>1 && $1 != "" && $1 != "help" {print $1}' |
      while read -r cmd; do
        echo ".SS \"barngate $cmd\""
        echo ".nf"
        "$exe" "$cmd" --help | sed 's/\\/\\e/g; s/^\./\\\&./; s/^'"'"'/\\\&'"'"'/'
        echo ".fi"
      done
  } >> "$h2m"
  help2man --no-info --section 1 --include "$h2m" \
    --name "on-site TLS MQTT gateway for ESP32-CAM camera nodes" \
    --output "$stage/barngate.1" "$exe"
  gzip -9n < "$stage/barngate.1" > "$pkg/usr/share/man/man1/barngate.1.gz"
  chmod 0644 "$pkg/usr/share/man/man1/barngate.1.gz" "$pkg/usr/share/doc/barngate/README.md.gz"

  for s in postinst prerm postrm; do
    install -m 0755 "packaging/debian/$s" "$pkg/DEBIAN/$s"
  done
  echo /etc/barngate/barngate.toml > "$pkg/DEBIAN/conffiles"

  # The newest glibc symbol version the binary needs.
  local glibc
  glibc=$(readelf -W --dyn-syms "$pkg/usr/bin/barngate" | grep -o 'GLIBC_2\.[0-9.]*' | sed 's/GLIBC_//' | sort -V | tail -1)
  [ -n "$glibc" ] || glibc=2.17
  local size
  size=$(du -sk --exclude=DEBIAN "$pkg" | cut -f1)
  cat > "$pkg/DEBIAN/control" <<EOF
Package: barngate
Version: $version
Architecture: $arch
Maintainer: barngate maintainers <barngate@localhost>
Installed-Size: $size
Depends: libc6 (>= $glibc), adduser
Recommends: systemd
Section: net
Priority: optional
Description: on-site TLS MQTT gateway for ESP32-CAM camera nodes
 barngate runs on a barn-side Raspberry Pi (or any Debian host): a
 mutual-TLS MQTT front where every camera node has its own certificate, an
 embedded MQTT broker, an ingest that reassembles chunked images and
 schedules wakes, an embedded database, a local dashboard with /metrics and
 /healthz, and a store-and-forward sync to PostgreSQL and S3-compatible
 storage. The service runs as the barngate user with its data in
 /var/lib/barngate and its settings in /etc/barngate/barngate.toml.
EOF
  (cd "$pkg" && find . -type f ! -path './DEBIAN/*' -printf '%P\0' | sort -z | xargs -0 md5sum) > "$pkg/DEBIAN/md5sums"
  chmod 0644 "$pkg/DEBIAN/control" "$pkg/DEBIAN/conffiles" "$pkg/DEBIAN/md5sums"

  local deb=$out/barngate_${version}_${arch}.deb
  dpkg-deb --root-owner-group "-Z${BARNGATE_DEB_COMPRESS:-xz}" --build "$pkg" "$deb" >/dev/null
  echo "build-deb: $deb ($(du -h "$deb" | cut -f1), libc6 >= $glibc)"
}

for a in "${arches[@]}"; do
  build_one "$a"
done
