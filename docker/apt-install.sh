#!/bin/sh
# apt-get install for the Debian-based images (postgres, proxy): no service starts during the
# build (policy-rc.d), a stalled download is retried rather than hanging the build, and the
# package lists are dropped afterwards.
set -eu
printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
chmod +x /usr/sbin/policy-rc.d
printf 'Acquire::Retries "3";\nAcquire::http::Timeout "30";\n' > /etc/apt/apt.conf.d/80erc-retries
apt-get update
DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@"
rm -rf /var/lib/apt/lists/*
