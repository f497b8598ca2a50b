#!/bin/bash
# Runs inside the VM (tests/e2e/vm-run), as root, in the share (/host). Installs moltbot
# by name from the flat apt repository the build wrote, then hands over to guest.py,
# which runs the scenarios with the package's own Python. Results: /host/results.json.
set -u
cd /host
echo "INFO kernel $(uname -r); $(systemctl --version | head -1); $(python3 --version)"
systemctl is-system-running --wait >/dev/null
# Only the shared repository: the VM has no network, so the image's own sources would fail.
echo 'deb [trusted=yes] file:/host/apt ./' > /etc/apt/sources.list.d/moltbot.list
apt_local=(-o Dir::Etc::sourcelist=/etc/apt/sources.list.d/moltbot.list
           -o Dir::Etc::sourceparts=- -o APT::Get::List-Cleanup=0)
start=$SECONDS
if apt-get "${apt_local[@]}" update -q >/tmp/apt.log 2>&1 \
   && DEBIAN_FRONTEND=noninteractive apt-get "${apt_local[@]}" install -y moltbot >>/tmp/apt.log 2>&1
then
  echo "INFO apt install moltbot took $((SECONDS - start))s"
  installed=1
else
  echo "FAIL apt-install-by-name"; tail -40 /tmp/apt.log; installed=0
fi
if [ "$installed" = 1 ]; then
  /usr/lib/moltbot/venv/bin/python /host/guest.py
else
  echo '{"apt-install-by-name": {"ok": false, "detail": "see the output"}}' > /host/results.json
  exit 1
fi
