#!/usr/bin/env bash
# The amd64 package's install / upgrade / remove / purge cycle, on this machine
# (root, Debian): run by .ci/run.
#
#   packaging/test-deb.sh [BINARY]
#
# Packages BINARY (default: the native build's target/debug/barngate, which
# the test suite has just built: the package's mechanics do not depend on the
# profile) twice, as version V and V+test2, then:
#   dpkg -i V     the barngate user, /var/lib/barngate 0700, the conffile
#                 (root:barngate 0640), unit enabled, man page; the unit's
#                 ExecStart run as the barngate user with the unit's
#                 environment (systemd itself when it runs, which a container
#                 usually does not), /healthz, a device issued through the
#                 running gateway and an mTLS mosquitto_pub as that device;
#   dpkg -i V+test2 (an upgrade): database, site CA and a local edit of the
#                 conffile kept; the gateway starts on them and still knows the
#                 device;
#   dpkg -r       binary and unit gone, data, config and user kept;
#   dpkg -P       data and config gone.
# Refuses to run where a barngate package it did not install is present.
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."

[ "$(id -u)" -eq 0 ] || { echo "test-deb: needs root (dpkg -i)" >&2; exit 1; }
bin=${1:-${CARGO_TARGET_DIR:-target}/debug/barngate}
[ -x "$bin" ] || { echo "test-deb: no binary at $bin (build it first: cargo build)" >&2; exit 1; }
for c in curl mosquitto_pub dpkg-deb runuser setpriv python3; do
  command -v "$c" >/dev/null || { echo "test-deb: $c is missing" >&2; exit 1; }
done

marker=/var/lib/barngate/.barngate-test-deb
if dpkg-query -W -f='${Status}' barngate 2>/dev/null | grep -q 'installed\|config-files'; then
  if [ -e "$marker" ] || [ ! -e /var/lib/barngate ]; then
    echo "test-deb: purging a barngate package left by an earlier run of this test"
    dpkg -P barngate >/dev/null
  else
    echo "test-deb: a barngate package is installed here and not by this test: not touching it" >&2
    exit 1
  fi
fi

work=$(mktemp -d)
gw_pid=""
cleanup() {
  local rc=$?
  if [ -n "$gw_pid" ] && kill -0 "$gw_pid" 2>/dev/null; then
    kill -TERM "$gw_pid" 2>/dev/null || true
    wait "$gw_pid" 2>/dev/null || true
  fi
  if [ $rc -ne 0 ]; then
    echo "test-deb: FAILED; gateway log:" >&2
    tail -n 40 "$work/gateway.log" 2>/dev/null >&2 || true
    dpkg -P barngate >/dev/null 2>&1 || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

fail() { echo "test-deb: FAIL: $*" >&2; exit 1; }
check() { echo "test-deb: ok: $*"; }
mode_of() { stat -c '%a %U:%G' "$1"; }

base=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
v1=$base
v2=$base+test2
t0=$(date +%s)
export BARNGATE_BIN=$bin BARNGATE_DEB_OUT=$work BARNGATE_DEB_COMPRESS=gzip
BARNGATE_DEB_VERSION=$v1 packaging/build-deb.sh amd64
BARNGATE_DEB_VERSION=$v2 packaging/build-deb.sh amd64
echo "test-deb: two packages built in $(( $(date +%s) - t0 )) s"
deb1=$work/barngate_${v1}_amd64.deb
deb2=$work/barngate_${v2}_amd64.deb

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

unit=/lib/systemd/system/barngate.service
systemd_runs() { [ -d /run/systemd/system ]; }

# Starts the gateway as the unit would. Without systemd: the unit's User,
# UMask, Environment= lines and ExecStart, the listeners moved to free
# loopback ports (the conffile's 0.0.0.0:8883 may be taken on a shared host).
start_gateway() {
  mqtt_port=$(free_port)
  http_port=$(free_port)
  if systemd_runs; then
    mkdir -p /run/systemd/system/barngate.service.d
    printf '[Service]\nExecStart=\nExecStart=/usr/bin/barngate serve --mqtt-listen 127.0.0.1:%s --http-listen 127.0.0.1:%s\n' \
      "$mqtt_port" "$http_port" > /run/systemd/system/barngate.service.d/test-ports.conf
    systemctl daemon-reload
    systemctl restart barngate.service
  else
    local user exec envs=()
    user=$(sed -n 's/^User=//p' "$unit")
    exec=$(sed -n 's/^ExecStart=//p' "$unit")
    while IFS= read -r e; do envs+=("$e"); done < <(sed -n 's/^Environment=//p' "$unit")
    [ "$user" = barngate ] || fail "unit runs as '$user', not barngate"
    # shellcheck disable=SC2086
    # setpriv execs (no forking parent in between): SIGTERM reaches the gateway.
    (umask 0077; exec setpriv --reuid="$user" --regid="$user" --init-groups \
      env -i PATH=/usr/bin:/bin "${envs[@]}" \
      $exec --mqtt-listen "127.0.0.1:$mqtt_port" --http-listen "127.0.0.1:$http_port") \
      >> "$work/gateway.log" 2>&1 &
    gw_pid=$!
  fi
  local i
  for i in $(seq 1 300); do
    if curl -fsS "http://127.0.0.1:$http_port/healthz" > "$work/healthz" 2>/dev/null; then
      check "/healthz answered: $(head -c 200 "$work/healthz")"
      return 0
    fi
    if [ -n "$gw_pid" ] && ! kill -0 "$gw_pid" 2>/dev/null; then
      fail "the gateway exited before answering /healthz"
    fi
    sleep 0.2
  done
  fail "no answer from /healthz within 60 s"
}

stop_gateway() {
  if systemd_runs; then
    systemctl stop barngate.service
    rm -rf /run/systemd/system/barngate.service.d
    systemctl daemon-reload
  else
    kill -TERM "$gw_pid"
    local rc=0
    wait "$gw_pid" || rc=$?
    gw_pid=""
    [ $rc -eq 0 ] || fail "the gateway exited with $rc on SIGTERM"
  fi
  check "gateway stopped cleanly"
}

# The CLI as the README tells an administrator to run it.
as_barngate() {
  runuser -u barngate -- /usr/bin/barngate --data-dir /var/lib/barngate \
    --config /etc/barngate/barngate.toml "$@"
}

# --- install ---------------------------------------------------------------
dpkg -i "$deb1" > "$work/dpkg-i.log" 2>&1 || { cat "$work/dpkg-i.log" >&2; fail "dpkg -i $v1"; }
install -o barngate -g barngate -m 0600 /dev/null "$marker"
[ "$(dpkg-query -W -f='${Version} ${Status}' barngate)" = "$v1 install ok installed" ] || fail "package state after dpkg -i"
check "dpkg -i $v1"
getent passwd barngate > "$work/passwd" || fail "no barngate user"
IFS=: read -r _ _ uid _ _ home shell < "$work/passwd"
[ "$uid" -lt 1000 ] || fail "barngate is not a system user (uid $uid)"
[ "$home" = /var/lib/barngate ] || fail "barngate's home is $home"
[ "$shell" = /usr/sbin/nologin ] || fail "barngate's shell is $shell"
check "system user barngate (uid $uid, home $home, shell $shell)"
[ "$(mode_of /var/lib/barngate)" = "700 barngate:barngate" ] || fail "/var/lib/barngate is $(mode_of /var/lib/barngate)"
check "/var/lib/barngate 700 barngate:barngate"
dpkg-query -W -f='${Conffiles}\n' barngate | grep -q '^ /etc/barngate/barngate.toml ' || fail "/etc/barngate/barngate.toml is not a conffile"
[ "$(mode_of /etc/barngate/barngate.toml)" = "640 root:barngate" ] || fail "conffile is $(mode_of /etc/barngate/barngate.toml)"
check "conffile /etc/barngate/barngate.toml 640 root:barngate"
[ -x /usr/bin/barngate ] && /usr/bin/barngate --version | grep -q "^barngate " || fail "/usr/bin/barngate --version"
[ -f "$unit" ] || fail "no unit at $unit"
grep -q '^ExecStart=/usr/bin/barngate serve$' "$unit" || fail "unit's ExecStart"
grep -q '^Environment=MIMALLOC_PURGE_DELAY=0$' "$unit" || fail "unit's allocator setting (MIMALLOC_PURGE_DELAY=0)"
[ -L /etc/systemd/system/multi-user.target.wants/barngate.service ] || fail "unit not enabled"
check "unit installed and enabled"
zcat /usr/share/man/man1/barngate.1.gz | grep -q 'device issue' || fail "man page"
check "man page"

start_gateway
out=/var/lib/barngate/provision/B8F862F9CFB8
as_barngate device issue B8F862F9CFB8 --out "$out" > "$work/issue.log" || { cat "$work/issue.log" >&2; fail "device issue"; }
check "device issued through the running gateway: $(head -1 "$work/issue.log")"
mosquitto_pub -h 127.0.0.1 -p "$mqtt_port" -i B8F862F9CFB8 -q 1 \
  --cafile "$out/ca.crt.pem" --cert "$out/B8F862F9CFB8.crt.pem" --key "$out/B8F862F9CFB8.key.pem" \
  -t ESP32CAM/B8F862F9CFB8/status -m '{"device_id":"B8F862F9CFB8","status":"alive","pendingImg":0}' \
  || fail "mTLS mosquitto_pub as the issued device"
for i in $(seq 1 50); do
  curl -fsS "http://127.0.0.1:$http_port/metrics" | grep -Eq '^barngate_hellos_total [1-9]' && break
  [ "$i" -lt 50 ] || fail "the gateway did not count the HELLO"
  sleep 0.2
done
check "mTLS mosquitto_pub HELLO handled"
stop_gateway

[ -z "$(find /var/lib/barngate ! -user barngate)" ] || fail "files not owned by barngate: $(find /var/lib/barngate ! -user barngate)"
check "every file in /var/lib/barngate belongs to barngate"
db=$(find /var/lib/barngate -maxdepth 1 -name '*.redb' | head -1)
[ -n "$db" ] || fail "no database in /var/lib/barngate"
kept=("$db" /var/lib/barngate/certs/ca.crt.pem /var/lib/barngate/certs/ca.key.pem
  /var/lib/barngate/certs/server.crt.pem /var/lib/barngate/certs/server.key.pem)
sum_before=$(sha256sum "${kept[@]}")
echo "# local edit kept by upgrades" >> /etc/barngate/barngate.toml

# --- upgrade ---------------------------------------------------------------
dpkg -i "$deb2" > "$work/dpkg-u.log" 2>&1 || { cat "$work/dpkg-u.log" >&2; fail "dpkg -i $v2 (upgrade)"; }
[ "$(dpkg-query -W -f='${Version}' barngate)" = "$v2" ] || fail "version after upgrade"
check "upgrade $v1 -> $v2"
[ "$(sha256sum "${kept[@]}")" = "$sum_before" ] || fail "the upgrade changed the database or the certificates"
check "database, site CA and server certificate kept byte for byte"
grep -q '^# local edit kept by upgrades$' /etc/barngate/barngate.toml || fail "the upgrade lost the conffile's local edit"
[ "$(mode_of /etc/barngate/barngate.toml)" = "640 root:barngate" ] || fail "conffile after upgrade is $(mode_of /etc/barngate/barngate.toml)"
[ "$(mode_of /var/lib/barngate)" = "700 barngate:barngate" ] || fail "/var/lib/barngate after upgrade is $(mode_of /var/lib/barngate)"
check "conffile edit and modes kept"
start_gateway
as_barngate device list > "$work/list.log"
grep -q B8F862F9CFB8 "$work/list.log" || { cat "$work/list.log" >&2; fail "the device is gone after the upgrade"; }
check "the device is still registered after the upgrade"
stop_gateway

# --- remove, purge ---------------------------------------------------------
dpkg -r barngate > "$work/dpkg-r.log" 2>&1 || { cat "$work/dpkg-r.log" >&2; fail "dpkg -r"; }
[ ! -e /usr/bin/barngate ] && [ ! -e "$unit" ] || fail "binary or unit left after dpkg -r"
[ -f "$db" ] && [ -f /var/lib/barngate/certs/ca.crt.pem ] || fail "dpkg -r deleted the data"
[ -f /etc/barngate/barngate.toml ] || fail "dpkg -r deleted the config"
getent passwd barngate >/dev/null || fail "dpkg -r deleted the user"
check "dpkg -r: binary and unit gone; data, config and user kept"
dpkg -P barngate > "$work/dpkg-p.log" 2>&1 || { cat "$work/dpkg-p.log" >&2; fail "dpkg -P"; }
[ ! -e /var/lib/barngate ] && [ ! -e /etc/barngate ] || fail "dpkg -P left /var/lib/barngate or /etc/barngate"
if dpkg-query -W -f='${Status}' barngate 2>/dev/null | grep -q 'installed\|config-files'; then
  fail "dpkg -P left the package installed"
fi
check "dpkg -P: data and config gone"
echo "test-deb: install/upgrade/remove/purge cycle passed ($(( $(date +%s) - t0 )) s)"
