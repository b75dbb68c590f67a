#!/usr/bin/env bash
# Boots an appliance image in qemu (software emulation, UEFI firmware, serial console),
# waits until voicegate answers /health through a forwarded port, places a synthetic
# AudioSocket call through another forwarded port and checks the echo comes back.
# The image is not modified (-snapshot). x86_64 (qemu-system-x86_64, OVMF) takes about a
# minute or two on 2 cores without KVM; aarch64 (qemu-system-aarch64 -M virt -cpu max,
# AAVMF) several minutes, all of it emulated instruction by instruction.
#
#   image/boot-test.sh [ARCH] [IMAGE] [VOICEGATE]
#     ARCH       x86_64 or aarch64 (default: aarch64 if IMAGE's name says so, else x86_64)
#     IMAGE      default image/out/voicegate-ARCH.img
#     VOICEGATE  the host binary that places the call (default: the image's static one,
#                image/out/work-ARCH/root/usr/bin/voicegate, if it runs on this host)
# Writes to $OUT_DIR (default image/out/boot-test-ARCH): console.log, health.json,
# call.json, heard.wav. The ignored tests `cargo test --test image_boot -- --ignored` run this
# and then check the correlation of heard.wav with the fixture.
# Needs (Debian packages): qemu-system-x86 ovmf, or qemu-system-arm qemu-efi-aarch64.
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
case "${1:-}" in
  x86_64|aarch64) ARCH=$1; shift ;;
  *) case "$(basename -- "${1:-x}")" in *aarch64*) ARCH=aarch64 ;; *) ARCH=x86_64 ;; esac ;;
esac
IMG=$(realpath "${1:-$HERE/image/out/voicegate-$ARCH.img}")
VG=${2:-$HERE/image/out/work-$ARCH/root/usr/bin/voicegate}
if [ -z "${2:-}" ] && [ "$ARCH" != "$(uname -m)" ]; then
  echo "give the host's voicegate binary as the third argument (the image's is $ARCH)" >&2
  exit 2
fi
VG=$(realpath "$VG")
OUT_DIR=$(realpath -m "${OUT_DIR:-$HERE/image/out/boot-test-$ARCH}")
AS_PORT=${AS_PORT:-19092}
HEALTH_PORT=${HEALTH_PORT:-19100}
NET="user,id=n0,hostfwd=tcp:127.0.0.1:$AS_PORT-:9092,hostfwd=tcp:127.0.0.1:$HEALTH_PORT-:9100"
mkdir -p "$OUT_DIR"
case "$ARCH" in
  x86_64)
    BOOT_TIMEOUT=${BOOT_TIMEOUT:-420}
    OVMF=/usr/share/ovmf/OVMF.fd
    [ -f "$OVMF" ] || OVMF=/usr/share/OVMF/OVMF_CODE.fd
    QEMU_CMD=(qemu-system-x86_64 -accel tcg -m 1024 -smp 2 -bios "$OVMF") ;;
  aarch64)
    BOOT_TIMEOUT=${BOOT_TIMEOUT:-1500}
    # AAVMF (qemu-efi-aarch64): the code read-only, a private copy of the variable store.
    cp /usr/share/AAVMF/AAVMF_VARS.fd "$OUT_DIR/vars.fd"
    # CPU: the "max" CPU with pauth-impdef, a cheap pointer-authentication hash instead of
    # the architected QARMA one, which dominates TCG time for a pauth-built kernel and
    # userland (CPU=max for the architected one, CPU=cortex-a72 for a v8.0 core).
    QEMU_CMD=(qemu-system-aarch64 -M virt -cpu "${CPU:-max,pauth-impdef=on}" -accel tcg,thread=multi -m 1024 -smp 2
      -drive if=pflash,format=raw,readonly=on,file=/usr/share/AAVMF/AAVMF_CODE.fd
      -drive "if=pflash,format=raw,file=$OUT_DIR/vars.fd") ;;
esac
rm -f "$OUT_DIR"/{console.log,console.txt,health.json,health.raw,call.json,heard.wav}
start=$(date +%s)
"${QEMU_CMD[@]}" -nographic -no-reboot -snapshot \
  -drive "file=$IMG,format=raw,if=virtio" -netdev "$NET" -device virtio-net-pci,netdev=n0 \
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
echo "READY: $ARCH /health answered ${ready}s after qemu started: $(cat "$OUT_DIR/health.json")"
"$VG" call --to "127.0.0.1:$AS_PORT" --wav "$HERE/tests/fixtures/hello-world.wav" \
  --out "$OUT_DIR/heard.wav" --seconds 4 --json >"$OUT_DIR/call.json"
echo "call: echoed $(($(date +%s) - start))s after qemu started: $(head -c 400 "$OUT_DIR/call.json")"
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
echo "$ARCH image boot test PASSED (${ready}s to READY, $(($(date +%s) - start))s total)"
