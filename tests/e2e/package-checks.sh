#!/bin/bash
# Runs as root inside the Debian 12 test VM (tests/e2e/test_vm.py puts it in the share
# at /host with the .deb and the apt repository apt/). Installs the package, drives the
# service, removes and purges it, then installs it again by name from the apt repository.
# Prints each command and its output, one PASS/FAIL line per check, a summary; exits 1
# if any check failed.
set -uo pipefail
export DEBIAN_FRONTEND=noninteractive SYSTEMD_PAGER= SYSTEMD_COLORS=0 TERM=dumb
cd /host
pass=0 fail=0
t0=$(date +%s)
say() { printf '\n=== [%4ss] %s\n' "$(($(date +%s) - t0))" "$*"; }
run() { echo "+ $*"; "$@"; }
check() { # check NAME COMMAND...: PASS when the command succeeds
  local name=$1; shift
  if "$@" >/tmp/check.out 2>&1; then
    pass=$((pass + 1)); echo "PASS $name"
  else
    fail=$((fail + 1)); echo "FAIL $name"; sed 's/^/     /' /tmp/check.out
  fi
}
cg=/sys/fs/cgroup/moltbot.slice/moltbotd.service
unit_pids() { cat "$cg"/cgroup.procs "$cg"/*/cgroup.procs 2>/dev/null; }
infer_is() { # infer_is VERSION DATA: demo's answer to [[1,2,3,4]] comes from VERSION, is DATA
  moltctl infer demo --input x='[[1,2,3,4]]' -o json | python3 -c '
import json, sys
d = json.load(sys.stdin)
got = (d["version"], json.dumps(d["outputs"]["y"]["data"]))
assert got == (sys.argv[1], sys.argv[2]), got' "$1" "$2"
}
wait_active() {
  for _ in $(seq 240); do
    [[ $(systemctl is-active moltbotd) == active ]] && return 0
    [[ $(systemctl is-active moltbotd) == failed ]] && return 1
    sleep 0.5
  done
  return 1
}

say "install: apt install -y /host/moltbot_*.deb"
s=$(date +%s)
run apt-get install -y --no-install-recommends /host/moltbot_*.deb 2>&1 | grep -v '^\(Reading\|Building\)'
echo "(install took $(($(date +%s) - s)) s)"
check "package installed" dpkg-query -W -f='${Status}\n' moltbot
check "user and group moltbot" bash -c 'id moltbot && getent group moltbot'
check "unit enabled" systemctl is-enabled moltbotd
check "byte code compiled by postinst" test -f /usr/lib/moltbot/venv/lib/python3.11/site-packages/onnxruntime/__pycache__/__init__.cpython-311.pyc
check "demo models copied, owned by moltbot" bash -c \
  '[[ $(stat -c %U:%G /var/lib/moltbot/models/demo/v1.0/model.onnx) == moltbot:moltbot ]]'
run ls -l /usr/bin/moltbotd /usr/bin/moltctl /usr/lib/moltbot/venv/bin/python3
run head -1 /usr/lib/moltbot/venv/bin/moltbotd

say "service"
units=(/lib/systemd/system/moltbotd.service /lib/systemd/system/moltbotd-metrics.socket
       /lib/systemd/system/moltbot.slice)
run systemd-analyze verify --man=no "${units[@]}"
check "systemd-analyze verify" systemd-analyze verify --man=no "${units[@]}"
check "moltbotd active" wait_active
check "metrics at http://127.0.0.1:8474/metrics (moltbotd-metrics.socket)" python3 -c '
import urllib.request
text = urllib.request.urlopen("http://127.0.0.1:8474/metrics", timeout=30).read().decode()
assert "moltbot_build_info" in text, text[:500]'
s=$(systemctl show -p ActiveEnterTimestampMonotonic --value moltbotd)
run systemctl is-active moltbotd
run systemctl status moltbotd --no-pager -n 0
run ls -la /run/moltbot /var/lib/moltbot /var/log/moltbot
check "socket 0666 moltbot:moltbot" bash -c \
  '[[ $(stat -c %a:%U:%G /run/moltbot/moltbotd.sock) == 666:moltbot:moltbot ]]'

say "cgroups: $cg"
run ls "$cg"
run cat "$cg/cgroup.subtree_control"
for g in supervisor model-demo-v1.0 model-iris-v1; do
  check "cgroup $g/ exists and has processes" grep -q . "$cg/$g/cgroup.procs"
done
check "no process in the unit's own cgroup (all in leaves)" bash -c "! grep -q . $cg/cgroup.procs"
run grep . "$cg"/*/cgroup.procs

say "moltctl as root"
run moltctl status
check "moltctl status" moltctl status
check "moltctl health" moltctl health
run moltctl infer demo --input x='[[1,2,3,4]]'
check "infer on v1.0 answers 2x" infer_is v1.0 '[[2.0, 4.0, 6.0, 8.0]]'
run moltctl switch v2.0
check "a second switch v2.0 says it is already serving it" bash -c \
  'moltctl switch v2.0 | grep -q "already serving v2.0"'
check "demo active version is v2.0 after the switch" bash -c \
  "moltctl models -o json | python3 -c 'import json, sys; m = json.load(sys.stdin)[\"models\"]; assert [x[\"active\"] for x in m if x[\"name\"] == \"demo\"] == [\"v2.0\"], m'"
run moltctl infer demo --input x='[[1,2,3,4]]'
check "infer on v2.0 answers 10x" infer_is v2.0 '[[10.0, 20.0, 30.0, 40.0]]'
run ls "$cg"
check "cgroup model-demo-v2.0/ after the switch, model-demo-v1.0/ gone" bash -c \
  "grep -q . $cg/model-demo-v2.0/cgroup.procs && test ! -e $cg/model-demo-v1.0"
run moltctl infer iris --input x='[[5.1,3.5,1.4,0.2]]'
check "infer iris" moltctl infer iris --input x='[[5.1,3.5,1.4,0.2]]'

say "moltctl as other users"
useradd -m alice && useradd -m bob && adduser --quiet alice moltbot
check "group moltbot-admin exists (sysusers)" getent group moltbot-admin
check "alice (group moltbot) may read" runuser -u alice -- moltctl status
runuser -u alice -- moltctl scale demo 2; rc=$?
check "alice may not scale: exit 6 (PERMISSION_DENIED)" test "$rc" = 6
runuser -u bob -- moltctl status; rc=$?
echo "bob (no group): exit $rc"
check "bob (no group, no role) is refused with exit 6" test "$rc" = 6

say "bash completion and man pages"
check "bash completion: moltctl s<TAB>" bash -c '
  source /usr/share/bash-completion/completions/moltctl
  COMP_WORDS=(moltctl s); COMP_CWORD=1; _moltctl_completion moltctl
  printf "%s\n" "${COMPREPLY[@]}"; [[ " ${COMPREPLY[*]} " == *" switch "* ]]'
cat /tmp/check.out
# (the test image's dpkg excludes /usr/share/man and /usr/share/doc: ask dpkg instead)
check "man pages in the package" bash -c \
  'dpkg -L moltbot | grep -q man8/moltbotd.8.gz && dpkg -L moltbot | grep -q man1/moltctl.1.gz'

say "systemd-analyze security moltbotd"
run systemd-analyze security moltbotd --no-pager
systemd-analyze security moltbotd --no-pager | tail -1 > /tmp/score
# the level as a whole word after the score: a bare OK|SAFE also matched UNSAFE
check "exposure rated OK or better" grep -qE ': [0-9.]+ (PERFECT|SAFE|OK) ' /tmp/score

say "reload"
pids_before=$(cat "$cg/supervisor/cgroup.procs")
run systemctl reload moltbotd
reloaded() { # active again (systemd shows `reloading` until READY=1), same processes
  wait_active || { systemctl is-active moltbotd; return 1; }
  local after
  after=$(cat "$cg/supervisor/cgroup.procs")
  [[ $after == "$pids_before" ]] || { echo "supervisor/: before [$pids_before], after [$after]"; return 1; }
}
check "reload: still active, same main process" reloaded
run journalctl -u moltbotd --no-pager -o cat -n 4
run moltctl reload
check "moltctl reload" moltctl reload

say "watchdog (WatchdogSec=30s): still running 40 s after start, not restarted"
now=$(awk '{print int($1 * 1000000)}' /proc/uptime)
left=$(((s + 40000000 - now) / 1000000))
((left > 0)) && sleep "$left"
run systemctl show moltbotd -p NRestarts -p WatchdogUSec -p Result -p ActiveState
check "no restarts" bash -c '[[ $(systemctl show -p NRestarts --value moltbotd) == 0 ]]'
check "active after 40 s" bash -c '[[ $(systemctl is-active moltbotd) == active ]]'

say "stop"
s=$(date +%s.%N)
run systemctl stop moltbotd
echo "(stop took $(awk "BEGIN { print $(date +%s.%N) - $s }") s)"
run systemctl show moltbotd -p ActiveState -p Result -p ExecMainStatus
check "stopped cleanly (Result=success)" bash -c '[[ $(systemctl show -p Result --value moltbotd) == success ]]'
check "no process left in the unit's cgroup" bash -c '[[ -z $(cat '"$cg"'/cgroup.procs '"$cg"'/*/cgroup.procs 2>/dev/null) ]]'
check "no moltbot process anywhere" bash -c '! pgrep -u moltbot'
check "socket removed" test ! -e /run/moltbot/moltbotd.sock
run journalctl -u moltbotd --no-pager -o cat -n 6
run systemctl start moltbotd
check "started again" wait_active

say "upgrade path: apt install --reinstall (prerm upgrade, postinst configure 0.1.0)"
pid_before=$(systemctl show -p MainPID --value moltbotd)
run apt-get install -y --reinstall /host/moltbot_*.deb 2>&1 | grep -v '^\(Reading\|Building\)' | tee /tmp/reinstall.out
check "dpkg left no directory behind (no stale .pyc)" bash -c '! grep -i "not empty\|unable to delete" /tmp/reinstall.out'
check "restarted by postinst, active" bash -c \
  "wait_active() { for _ in \$(seq 240); do [[ \$(systemctl is-active moltbotd) == active ]] && return 0; sleep 0.5; done; return 1; }
   wait_active && [[ \$(systemctl show -p MainPID --value moltbotd) != $pid_before ]]"
check "byte code compiled again" test -f /usr/lib/moltbot/venv/lib/python3.11/site-packages/onnxruntime/__pycache__/__init__.cpython-311.pyc
check "models untouched" test -s /var/lib/moltbot/models/demo/v2.0/model.onnx

say "apt remove"
run apt-get remove -y moltbot 2>&1 | grep -v '^\(Reading\|Building\)'
check "service gone, no moltbot process" bash -c '! pgrep -u moltbot && ! systemctl is-active moltbotd'
check "metrics socket closed with it" bash -c \
  '! systemctl is-active moltbotd-metrics.socket && ! ss -Hltn "sport = :8474" | grep -q .'
check "remove keeps /var/lib/moltbot/models" test -s /var/lib/moltbot/models/demo/v1.0/model.onnx
check "remove keeps /etc/moltbot/moltbotd.yaml (conffile)" test -f /etc/moltbot/moltbotd.yaml
check "remove leaves nothing in /usr/lib/moltbot" test ! -e /usr/lib/moltbot
run dpkg-query -W -f='${Status}\n' moltbot

say "apt purge"
run apt-get purge -y moltbot 2>&1 | grep -v '^\(Reading\|Building\)'
check "purge removes /var/lib/moltbot" test ! -e /var/lib/moltbot
check "purge removes /etc/moltbot" test ! -e /etc/moltbot
check "purge removes /var/log/moltbot" test ! -e /var/log/moltbot
check "package gone" bash -c '! dpkg-query -W moltbot 2>/dev/null | grep -q .'
check "no enablement symlink left" bash -c '! ls /etc/systemd/system/*/moltbotd.service 2>/dev/null'
run id moltbot

say "apt install moltbot by name from the flat repository /host/apt"
echo "deb [trusted=yes] file:/host/apt ./" > /etc/apt/sources.list.d/moltbot.list
only_ours=(-o Dir::Etc::SourceList=/etc/apt/sources.list.d/moltbot.list -o Dir::Etc::SourceParts=-)
run apt-get "${only_ours[@]}" update 2>&1
run apt-cache policy moltbot
s=$(date +%s)
run apt-get "${only_ours[@]}" install -y --no-install-recommends moltbot 2>&1 | grep -v '^\(Reading\|Building\)'
echo "(install took $(($(date +%s) - s)) s)"
check "installed by name, service active" wait_active
run moltctl status
check "the demo is back (fresh repository after purge)" bash -c 'moltctl models | grep -q v1.0'

say "journal of moltbotd (last 40 lines)"
journalctl -u moltbotd --no-pager -o short-monotonic -n 40

say "warnings and errors moltbotd logged (whole run)"
journalctl -u moltbotd --no-pager -o cat | grep -E '\[(WARNING|ERROR|CRITICAL)\]|Traceback' || echo "(none)"

say "summary: $pass passed, $fail failed"
((fail == 0))
