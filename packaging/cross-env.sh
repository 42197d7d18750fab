# Sourced (not run): Debian's own Rust toolchain (rustc-web from
# bookworm-security, with the arm64 standard library through multiarch) for
# the aarch64 cross build, whatever rustup toolchain is first on PATH.
# packaging/install-cross-toolchain.sh installs it.
#
# The runner is qemu-aarch64-static *without* `-L /usr/aarch64-linux-gnu`:
# the binaries then use the multiarch libc6:arm64 (its loader is
# /lib/ld-linux-aarch64.so.1 on the host); with -L, qemu takes the cross
# package's loader but the multiarch libc (two glibc builds) and every program
# hangs at 100 % CPU when it starts its first thread.
export PATH="/usr/bin:$PATH"
export RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER=qemu-aarch64-static
# Its own target dir: Debian's rustc is another compiler than rustup's, and
# sharing one would rebuild the native artefacts back and forth.
export CARGO_TARGET_DIR="${BARNGATE_CROSS_TARGET_DIR:-${CARGO_TARGET_DIR:-target}/debian-cross}"
CROSS_CARGO=/usr/bin/cargo
CROSS_TARGET=aarch64-unknown-linux-gnu
