#!/usr/bin/env bash
# Inspects a built appliance image offline, without booting or mounting it (sfdisk, debugfs
# on the ext4 partitions at their offsets, mtools on the FAT one): the partition table, the
# static voicegate and its unit, user and directories in the read-only root, the writable
# state and config on the data partition, and the boot loader entry pointing at the root.
# Seconds; image/build.sh runs it at the end.
#
#   image/check.sh [IMAGE] [REPO]    (default image/out/voicegate-x86_64.img)
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
IMG=$(realpath "${1:-$HERE/image/out/voicegate-x86_64.img}")
fail=0
ok() { echo "ok: $*"; }
bad() { echo "FAILED: $*"; fail=1; }

# Partition n: start offset in bytes, PARTUUID, name (from sfdisk's dump).
part() { sfdisk -d "$IMG" | grep -E "^$IMG$1 :"; }
off() { echo $(( $(part "$1" | sed -E 's/.*start= *([0-9]+).*/\1/') * 512 )); }
uuid() { part "$1" | sed -E 's/.*uuid=([0-9A-Fa-f-]+).*/\1/' | tr 'A-F' 'a-f'; }
for n in 1:VG-BOOT 2:vg-root 3:vg-data; do
  part "${n%%:*}" | grep -q "name=\"${n#*:}\"" && ok "partition ${n%%:*} is ${n#*:}" || bad "partition ${n#*:}"
done
ROOT="$IMG?offset=$(off 2)"
DATA="$IMG?offset=$(off 3)"
dbg() { debugfs -R "$2" "$1" 2>/dev/null; }

# The read-only root.
dbg "$ROOT" 'cat /usr/lib/systemd/system/voicegate.service' | cmp -s - "$HERE/systemd/voicegate.service" \
  && ok "voicegate.service is the repository's" || bad "voicegate.service"
dbg "$ROOT" 'stat /usr/bin/voicegate' | grep -q 'Mode:  0755' && ok "/usr/bin/voicegate 0755" || bad "/usr/bin/voicegate"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
dbg "$ROOT" "dump /usr/bin/voicegate $tmp/voicegate" >/dev/null
file "$tmp/voicegate" | grep -Eq 'static(ally linked|-pie)' && ok "voicegate is static: $(file -b "$tmp/voicegate" | cut -d, -f1-2,4)" || bad "voicegate not static"
dbg "$ROOT" 'ls /etc/systemd/system/multi-user.target.wants' | grep -q voicegate.service \
  && ok "voicegate.service enabled" || bad "voicegate.service not enabled"
dbg "$ROOT" 'ls /etc/systemd/system/sysinit.target.wants' | grep -q nftables.service \
  && ok "nftables enabled" || bad "nftables not enabled"
dbg "$ROOT" 'cat /usr/lib/sysusers.d/voicegate.conf' | cmp -s - "$HERE/systemd/voicegate.sysusers" \
  && ok "sysusers entry" || bad "sysusers entry"
dbg "$ROOT" 'cat /usr/lib/tmpfiles.d/voicegate.conf' | cmp -s - "$HERE/systemd/voicegate.tmpfiles" \
  && ok "tmpfiles entry" || bad "tmpfiles entry"
VG_UID=$(dbg "$ROOT" 'cat /etc/passwd' | awk -F: '$1=="voicegate"{print $3}')
[ -n "$VG_UID" ] && ok "user voicegate ($VG_UID) in /etc/passwd" || bad "no voicegate user"
dbg "$ROOT" 'cat /etc/fstab' | grep -Eq '^PARTLABEL=vg-root +/ +ext4 +ro' && ok "root mounted read-only" || bad "fstab root ro"
dbg "$ROOT" 'stat /usr/sbin/sshd' | grep -q 'Inode:' && bad "an SSH server is installed" || ok "no SSH server"
# The writable data partition (/var).
dbg "$DATA" 'stat /lib/voicegate' | grep -Eq "User: +$VG_UID " && ok "/var/lib/voicegate owned by voicegate" || bad "/var/lib/voicegate"
dbg "$DATA" 'cat /etc/voicegate/voicegate.toml' | cmp -s - "$HERE/image/files/voicegate.toml" \
  && ok "default config in /var/etc/voicegate" || bad "default config"
# The boot partition: systemd-boot and an entry booting partition 2.
export MTOOLS_SKIP_CHECK=1
ESP="$IMG@@$(off 1)"
mdir -b -i "$ESP" ::/EFI/BOOT | grep -Eqi 'BOOT(X64|AA64)\.EFI' && ok "systemd-boot is the default EFI loader" || bad "EFI loader"
mtype -i "$ESP" ::/loader/entries/voicegate.conf | grep -q "root=PARTUUID=$(uuid 2) ro" \
  && ok "loader entry boots partition 2 read-only" || bad "loader entry"
for f in vmlinuz initrd.img voicegate/voicegate.toml.example voicegate/allow.nft.example; do
  mdir -b -i "$ESP" "::/$f" >/dev/null 2>&1 && ok "ESP has $f" || bad "ESP lacks $f"
done
[ $fail = 0 ] && echo "image check PASSED" || { echo "image check FAILED"; exit 1; }
