#!/usr/bin/env bash
# Set up a fresh machine and run the whole test suite: venv, project with test extras, redis-server,
# prometheus and openssl binaries (the tests start their own servers on free loopback ports and stop them), pytest.
# Extra arguments go to pytest, e.g. `scripts/test.sh -k pipeline`.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_install() {
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  # Install binaries only: a policy-rc.d that says 101 stops Debian from starting the packaged services,
  # so nothing is left listening on the standard ports; the tests start their own instances.
  local policy=/usr/sbin/policy-rc.d created=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null && $sudo chmod +x "$policy" && created=1
  fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@"
  [ "$created" -eq 0 ] || $sudo rm -f "$policy"
}

missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v openssl >/dev/null || missing+=(openssl)  # the rediss:// test makes a throw-away CA
{ command -v prometheus >/dev/null && command -v promtool >/dev/null; } || missing+=(prometheus)
[ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[worker,test,dev]'

# Two test processes (pytest-xdist; TEST_PROCESSES=0 runs them in this one): most of the suite's time is
# spent waiting on real processes (workers started, killed, leases expiring), so two halve it on 2 cores
# (12.3 -> 6.6 min measured). More would mostly add memory: each test starts its own workers (~0.6 GB each).
# --dist loadgroup: the modules that kill and time real workers or keep a core busy share one test process and
# run one after another (tests/conftest.py HEAVY_MODULES); the other process takes the rest.
exec .venv/bin/python -m pytest -n "${TEST_PROCESSES:-2}" --dist loadgroup "$@"
