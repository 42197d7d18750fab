#!/usr/bin/env bash
# Installs Debian's toolchain for the aarch64 cross build (once; a no-op when
# everything is there): rustc-web/cargo-web with the amd64 and arm64 standard
# libraries, the aarch64 cross gcc and C library, qemu-user-static, and
# help2man for the man page of the packages.
set -euo pipefail

ok=1
[ -x /usr/bin/rustc ] && [ -x /usr/bin/cargo ] || ok=0
[ -d /usr/lib/rustlib/aarch64-unknown-linux-gnu/lib ] || ok=0
command -v aarch64-linux-gnu-gcc >/dev/null || ok=0
[ -e /usr/aarch64-linux-gnu/include/stdio.h ] || ok=0
command -v qemu-aarch64-static >/dev/null || ok=0
command -v help2man >/dev/null || ok=0
if [ "$ok" = 1 ]; then
  echo "cross toolchain: already installed ($(/usr/bin/rustc --version))"
  exit 0
fi

SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
  echo "cross toolchain: adding the arm64 architecture to dpkg"
  $SUDO dpkg --add-architecture arm64
fi
echo "cross toolchain: installing Debian's rustc-web, the arm64 std, the aarch64 gcc and qemu"
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends \
  rustc-web cargo-web libstd-rust-web-dev libstd-rust-web-dev:arm64 \
  gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user-static help2man
if [ ! -d /usr/lib/rustlib/aarch64-unknown-linux-gnu/lib ]; then
  echo "cross toolchain: no aarch64 standard library under /usr/lib/rustlib after the install" >&2
  exit 1
fi
echo "cross toolchain: $(/usr/bin/rustc --version)"
