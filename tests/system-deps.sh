#!/usr/bin/env bash
# Installs the system packages the test suite starts itself (Debian/Ubuntu).
# Package maintainer scripts are kept from starting services of their own.
set -euo pipefail
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
# A real one-node SLURM cluster, started by slurm/local/start.sh (which would
# install these itself; installing them here keeps the test run's clock clean).
command -v slurmctld >/dev/null || missing+=(slurmctld)
command -v slurmd >/dev/null || missing+=(slurmd)
command -v sbatch >/dev/null || missing+=(slurm-client)
command -v munged >/dev/null || missing+=(munge)
# PostgreSQL's server binaries: the chaos tests start and restart a cluster of their own.
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
command -v runuser >/dev/null || missing+=(util-linux)
# The dashboard's browser tests drive Debian's Chromium (through Playwright);
# the metrics tests start a real Prometheus server that scrapes the service.
command -v chromium >/dev/null || missing+=(chromium)
command -v prometheus >/dev/null || missing+=(prometheus)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "missing system packages: ${missing[*]}; install them (as root: apt-get install ${missing[*]})" >&2
  exit 1
fi
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && created_policy=1
fi
trap '[ $created_policy = 1 ] && rm -f "$policy"' EXIT
apt-get update -q
DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
