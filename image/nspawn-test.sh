#!/usr/bin/env bash
# The unit and its watchdog under the image's own systemd (252), in seconds: boots a copy of
# the image's root tree (left by image/build.sh in image/out/work-ARCH/root) with
# `systemd-nspawn --boot` and runs systemd/boot-test.sh's checks there: Type=notify READY as
# the voicegate user with the hardening on, /health, a call through the echo agent, reload
# into maintenance, and a stalled process (SIGSTOP) killed by the
# watchdog ("Failed with result 'watchdog'") and restarted.
#
#   sudo image/nspawn-test.sh [ROOT_TREE]
# The copy differs from the image only in /etc/fstab (a container has no vg-root/vg-data/
# VG-BOOT partitions to mount; the read-only root and the /var partition are exercised by
# image/boot-test.sh in qemu instead) and a masked systemd-networkd-wait-online (no network). Needs: systemd-container.
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
TREE=$(realpath "${1:-$HERE/image/out/work-x86_64/root}")
COPY=${COPY:-/tmp/vg-image-nspawn}
[ -x "$TREE/usr/bin/voicegate" ] || { echo "no image tree at $TREE (run image/build.sh)" >&2; exit 1; }
rm -rf "$COPY"
cp -a --reflink=auto "$TREE" "$COPY"
printf '# container: no partitions\ntmpfs /tmp tmpfs mode=1777,nosuid,nodev 0 0\n' >"$COPY/etc/fstab"
# --private-network leaves only lo: waiting for a DHCP lease would hold network-online.target
# (and voicegate) for wait-online's 2 minutes.
ln -sf /dev/null "$COPY/etc/systemd/system/systemd-networkd-wait-online.service"
# An installer's boot-partition folder (in a container /boot/efi is a plain directory): a
# credential to be moved in and a firewall allowlist to be copied in.
mkdir -p "$COPY/boot/efi/voicegate/credentials"
echo "nspawn-test-secret" >"$COPY/boot/efi/voicegate/credentials/ari"
printf 'add element inet appliance allowed4 { 198.51.100.0/24 }\n' >"$COPY/boot/efi/voicegate/allow.nft"
rc=0
ROOTFS=$COPY "$HERE/systemd/boot-test.sh" "$TREE/usr/bin/voicegate" || rc=$?
# The image's own units came up too: the config import and the firewall.
J="journalctl --directory=$COPY/var/log/journal --no-pager"
for u in voicegate-import-config nftables; do
  if $J -u "$u" | grep -q "Finished $u.service"; then echo "$u: ok"; else echo "FAILED: $u"; $J -u "$u" | tail -5; rc=1; fi
done
# The import moved the credential (root-only) and copied the allowlist.
if [ "$(cat "$COPY/etc/voicegate/credentials/ari" 2>/dev/null)" = nspawn-test-secret ] \
  && [ "$(stat -c %a "$COPY/etc/voicegate/credentials/ari")" = 600 ] \
  && [ ! -e "$COPY/boot/efi/voicegate/credentials/ari" ]; then
  echo "credential import: ok"
else echo "FAILED: credential import"; rc=1; fi
grep -q 198.51.100.0/24 "$COPY/etc/voicegate/allow.nft" && echo "allow.nft import: ok" \
  || { echo "FAILED: allow.nft import"; rc=1; }
[ $rc = 0 ] && echo "image nspawn test PASSED" || echo "image nspawn test FAILED"
rm -rf "$COPY"
exit $rc
