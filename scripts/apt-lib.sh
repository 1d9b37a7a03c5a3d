# shellcheck shell=bash
# apt_install PACKAGE…: installs Debian packages as root, waiting for another install that holds
# the package manager's locks (a fresh cloud machine's boot-time upgrades do, for minutes)
# instead of failing at once. Sourced by scripts/pg-lib.sh and scripts/browser.
#
# apt-get install waits by itself with DPkg::Lock::Timeout; apt-get update (apt 2.6) ignores it
# for the package lists' lock, so it is tried again, a few seconds apart, while that lock is held.
APT_LOCK_WAIT_SECS=${APT_LOCK_WAIT_SECS:-600}

apt_install() {
  export DEBIAN_FRONTEND=noninteractive
  local deadline=$((SECONDS + APT_LOCK_WAIT_SECS)) output
  until output=$(apt-get -o DPkg::Lock::Timeout="$APT_LOCK_WAIT_SECS" update -qq 2>&1); do
    if ! grep -q "Could not get lock" <<<"$output" || [ "$SECONDS" -ge "$deadline" ]; then
      echo "$output" >&2
      return 1
    fi
    echo "waiting for another package install to finish (it holds apt's lock)" >&2
    sleep 5
  done
  apt-get -o DPkg::Lock::Timeout="$APT_LOCK_WAIT_SECS" install -y -qq "$@" >&2
}
