#!/usr/bin/env bash
# Boots the unit under a real systemd (252, Debian 12) in a systemd-nspawn container and
# checks it end to end: Type=notify start as the voicegate user with the hardening on,
# credentials, /health, a call through the echo agent, `systemctl reload` switching on
# maintenance (the next call gets 0x00 and a "fallback (maintenance)" record), and a stalled
# runtime killed by the watchdog and restarted. Manual (root, ~2 min for the first
# debootstrap from deb.debian.org, ~30 s after); not part of `cargo test`.
#
#   sudo systemd/boot-test.sh target/debug/voicegate
# Needs: debootstrap systemd-container (apt-get install debootstrap systemd-container).
set -euo pipefail
BIN=$(realpath "${1:?usage: $0 PATH/TO/voicegate}")
HERE=$(cd "$(dirname "$0")/.." && pwd)
R=${ROOTFS:-/tmp/vg-nspawn}
if [ ! -x "$R/usr/lib/systemd/systemd" ]; then
  debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus bookworm "$R" \
    http://deb.debian.org/debian >/dev/null
fi
install -m0755 "$BIN" "$R/usr/bin/voicegate"
install -m0644 "$HERE/systemd/voicegate.sysusers" "$R/usr/lib/sysusers.d/voicegate.conf"
install -m0644 "$HERE/systemd/voicegate.tmpfiles" "$R/usr/lib/tmpfiles.d/voicegate.conf"
install -m0644 "$HERE/systemd/voicegate.service" "$R/etc/systemd/system/voicegate.service"
rm -rf "$R/etc/systemd/system/voicegate.service.d" "$R/var/lib/voicegate/records" "$R/root/check.log"
mkdir -p "$R/etc/voicegate" "$R/etc/systemd/system/multi-user.target.wants"
cp "$HERE/examples/voicegate.toml" "$R/etc/voicegate/voicegate.toml"
ln -sf /etc/systemd/system/voicegate.service "$R/etc/systemd/system/multi-user.target.wants/"
cat > "$R/usr/local/bin/vg-check.sh" <<'EOF'
#!/bin/bash
exec > /root/check.log 2>&1
sleep 3
echo "active: $(systemctl is-active voicegate)"
systemctl show -p StatusText -p User voicegate
exec 3<>/dev/tcp/127.0.0.1/9100
printf 'GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n' >&3
echo "health: $(head -1 <&3)"; exec 3<&-
echo "call1: $(voicegate call --to 127.0.0.1:9092 --seconds 2 --json)"
sed -i 's/^maintenance = false/maintenance = true/' /etc/voicegate/voicegate.toml
systemctl reload voicegate && echo "reload: ok"
sleep 1
echo "call2: $(voicegate call --to 127.0.0.1:9092 --seconds 2 --json)"
runuser -u voicegate -- voicegate --config /etc/voicegate/voicegate.toml records list
mkdir -p /etc/systemd/system/voicegate.service.d
# A stalled process: the release binary has no stall hook (issue 14), so stop it from
# outside. systemd's watchdog abort comes with a SIGCONT, so the kill goes through.
printf '[Service]\nWatchdogSec=4s\n' > /etc/systemd/system/voicegate.service.d/stall.conf
systemctl daemon-reload; systemctl restart voicegate; sleep 3
kill -STOP "$(systemctl show -p MainPID --value voicegate)"; sleep 12
journalctl -u voicegate --no-pager -b | grep -E "Watchdog timeout|result 'watchdog'|Scheduled restart"
echo CHECK-DONE
systemctl poweroff
EOF
chmod +x "$R/usr/local/bin/vg-check.sh"
printf '[Unit]\nAfter=voicegate.service\n[Service]\nType=oneshot\nExecStart=/usr/local/bin/vg-check.sh\n[Install]\nWantedBy=multi-user.target\n' \
  > "$R/etc/systemd/system/vg-check.service"
ln -sf /etc/systemd/system/vg-check.service "$R/etc/systemd/system/multi-user.target.wants/"
timeout 180 systemd-nspawn -D "$R" --register=no --keep-unit --private-network --boot >/dev/null 2>&1 || true
cat "$R/root/check.log"
fail=0
check() { grep -qE "$1" "$R/root/check.log" || { echo "FAILED: $2"; fail=1; }; }
check '^active: active' "unit active after start"
check '^User=voicegate' "runs as voicegate"
check '^health: HTTP/1.1 200' "/health answers 200"
check '^call1: .*"hangup_received":false' "call through the echo agent"
check '^reload: ok' "systemctl reload"
check '^call2: .*"hangup_received":true' "maintenance: 0x00 at once"
check 'fallback .*\(maintenance\)' "maintenance call recorded"
check "result 'watchdog'" "stalled runtime killed by the watchdog"
check 'Scheduled restart' "and restarted"
[ $fail = 0 ] && echo "boot test PASSED" || { echo "boot test FAILED"; exit 1; }
