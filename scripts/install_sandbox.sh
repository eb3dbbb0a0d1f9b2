#!/usr/bin/env bash
# Make sure bubblewrap (bwrap) is available for distil_ray.feedback.sandbox. Idempotent.
#
# Without bwrap the sandbox still runs code, but with rlimits only: no filesystem, network or
# process isolation. This script installs it with apt-get when it can (root + apt-get), and
# otherwise says loudly what is missing. It never fails the caller's setup: exit status is 0.
set -uo pipefail

warn() {
  echo "================================================================================" >&2
  echo "WARNING: $*" >&2
  echo "WARNING: distil_ray's code sandbox will fall back to rlimits-only isolation" >&2
  echo "WARNING: (untrusted code could read/write files, use the network, signal processes)." >&2
  echo "================================================================================" >&2
}

if command -v bwrap >/dev/null 2>&1; then
  echo "sandbox: bubblewrap present ($(bwrap --version 2>/dev/null || echo 'unknown version'))"
elif [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "sandbox: installing bubblewrap with apt-get"
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap; }; then
    warn "apt-get could not install bubblewrap."
    exit 0
  fi
else
  warn "bubblewrap (bwrap) is not installed and cannot be installed here (need root and apt-get); install the 'bubblewrap' package."
  exit 0
fi

# bwrap being installed is not enough (containers may forbid namespaces): run the same
# self-check the sandbox runs, with this checkout's Python if there is one.
py=""
for cand in "$(dirname "$0")/../.venv/bin/python" python3; do
  if command -v "$cand" >/dev/null 2>&1; then py="$cand"; break; fi
done
if [ -n "$py" ]; then
  out=$(cd "$(dirname "$0")/.." && "$py" -c '
import sys
try:
    from distil_ray.feedback.sandbox import bwrap_status
except ImportError as e:
    print(f"self-check skipped ({e})")
    sys.exit(2)
ok, why = bwrap_status()
print("bubblewrap self-check passed" if ok else why)
sys.exit(0 if ok else 1)' 2>&1)
  case $? in
    0|2) echo "sandbox: ${out##*$'\n'}" ;;
    *) warn "bubblewrap is installed but does not work here: ${out##*$'\n'}" ;;
  esac
fi
exit 0
