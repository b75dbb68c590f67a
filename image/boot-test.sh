#!/usr/bin/env bash
# Boots the x86_64 appliance image in qemu (software emulation, UEFI with OVMF, serial
# console), waits until voicegate answers /health through a forwarded port, places a
# synthetic AudioSocket call through another forwarded port and checks the echo comes back.
# The image is not modified (-snapshot). Takes about a minute or two on 2 cores without KVM.
#
#   image/boot-test.sh [IMAGE] [VOICEGATE]
#     IMAGE      default image/out/voicegate-x86_64.img
#     VOICEGATE  the host binary that places the call (default: the image's static one,
#                image/out/work-x86_64/root/usr/bin/voicegate)
# Writes to $OUT_DIR (default image/out/boot-test): console.log, health.json, call.json,
# heard.wav. The ignored test `cargo test --test image_boot -- --ignored` runs this and then
# checks the correlation of heard.wav with the fixture.
# Needs: qemu-system-x86 ovmf (Debian packages).
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
IMG=$(realpath "${1:-$HERE/image/out/voicegate-x86_64.img}")
VG=$(realpath "${2:-$HERE/image/out/work-x86_64/root/usr/bin/voicegate}")
OUT_DIR=$(realpath -m "${OUT_DIR:-$HERE/image/out/boot-test}")
AS_PORT=${AS_PORT:-19092}
HEALTH_PORT=${HEALTH_PORT:-19100}
BOOT_TIMEOUT=${BOOT_TIMEOUT:-420}
OVMF=/usr/share/ovmf/OVMF.fd
[ -f "$OVMF" ] || OVMF=/usr/share/OVMF/OVMF_CODE.fd
mkdir -p "$OUT_DIR"
rm -f "$OUT_DIR"/{console.log,console.txt,health.json,health.raw,call.json,heard.wav}
start=$(date +%s)
qemu-system-x86_64 -accel tcg -m 1024 -smp 2 -nographic -no-reboot -snapshot \
  -bios "$OVMF" -drive "file=$IMG,format=raw,if=virtio" \
  -netdev "user,id=n0,hostfwd=tcp:127.0.0.1:$AS_PORT-:9092,hostfwd=tcp:127.0.0.1:$HEALTH_PORT-:9100" \
  -device virtio-net-pci,netdev=n0 \
  -serial "file:$OUT_DIR/console.log" -monitor none -display none </dev/null >/dev/null 2>&1 &
QEMU=$!
trap 'kill $QEMU 2>/dev/null || true; wait $QEMU 2>/dev/null || true' EXIT

health() { # one GET /health through the forwarded port; the body on stdout
  exec 3<>"/dev/tcp/127.0.0.1/$HEALTH_PORT" || return 1
  printf 'GET /health HTTP/1.1\r\nHost: voicegate\r\nConnection: close\r\n\r\n' >&3
  timeout 5 cat <&3 >"$OUT_DIR/health.raw" || true
  exec 3<&-
  head -1 "$OUT_DIR/health.raw" | grep -q ' 200 ' || return 1
  sed '1,/^\r\?$/d' "$OUT_DIR/health.raw" >"$OUT_DIR/health.json"
}
until health 2>/dev/null; do
  kill -0 $QEMU 2>/dev/null || { echo "qemu exited; console:"; tail -40 "$OUT_DIR/console.log"; exit 1; }
  if [ $(($(date +%s) - start)) -gt "$BOOT_TIMEOUT" ]; then
    echo "no /health after ${BOOT_TIMEOUT}s; console:"; tail -40 "$OUT_DIR/console.log"; exit 1
  fi
  sleep 3
done
ready=$(($(date +%s) - start))
echo "READY: /health answered ${ready}s after qemu started: $(cat "$OUT_DIR/health.json")"
"$VG" call --to "127.0.0.1:$AS_PORT" --wav "$HERE/tests/fixtures/hello-world.wav" \
  --out "$OUT_DIR/heard.wav" --seconds 4 --json >"$OUT_DIR/call.json"
echo "call: $(head -c 400 "$OUT_DIR/call.json")"
grep -Eq '"audible_frames_received": *[1-9][0-9]' "$OUT_DIR/call.json" \
  || { echo "FAILED: no echo came back"; exit 1; }
echo "console: $(grep -a -m1 'Started.*voicegate' "$OUT_DIR/console.log" || true)"
# The writable data partition on /var, and /etc/voicegate bound from it (the root is ro).
sed 's/\x1b\[[0-9;]*m//g' "$OUT_DIR/console.log" >"$OUT_DIR/console.txt"
for m in 'Mounted var.mount' 'Mounted etc-voicegate.mount' 'Finished voicegate-import-'; do
  grep -aq "$m" "$OUT_DIR/console.txt" || { echo "FAILED: no '$m' on the console"; exit 1; }
done
# Every unit started: the firewall, the config import, network, time, voicegate.
if grep -a 'FAILED' "$OUT_DIR/console.txt"; then echo "FAILED: a unit failed during boot"; exit 1; fi
echo "image boot test PASSED (${ready}s to READY, $(($(date +%s) - start))s total)"
