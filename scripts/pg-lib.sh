# shellcheck shell=bash
# Sourced, not run: the server look-up, install and run-as-owner helpers shared by scripts/pg and
# scripts/pg-pair, so both find and install PostgreSQL the same way.
#
# The sourcing script defines die() first, and may set:
#   prog          its name, for messages (default scripts/pg)
#   install_hint  extra lines for the "not found" error (scripts/pg points at DATABASE_URL)

# apt_install (waits for the package manager's lock)
# shellcheck source-path=SCRIPTDIR source=apt-lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/apt-lib.sh"

# Where the server binaries are: Debian keeps them off PATH, under /usr/lib/postgresql/<major>/bin.
find_bindir() {
  local dir
  for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k4 -n -r); do
    [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ] && { echo "$dir"; return 0; }
  done
  # Elsewhere (a source build, Homebrew): look on PATH, but only for real files. `type -P` ignores
  # shell functions and aliases, which `command -v` would report.
  local pg_ctl
  pg_ctl=$(type -P pg_ctl || true)
  if [ -n "$pg_ctl" ] && [ -x "$(dirname "$pg_ctl")/initdb" ]; then
    dirname "$pg_ctl"
    return 0
  fi
  return 1
}

install_server() {
  if [ "$(id -u)" -eq 0 ] && [ -x /usr/bin/apt-get ]; then
    echo "${prog:-scripts/pg}: PostgreSQL server not found; installing it with apt-get" >&2
    apt_install --no-install-recommends postgresql
  else
    die "PostgreSQL server binaries (initdb, pg_ctl) not found.
  Install them:   sudo apt-get install postgresql     (Debian/Ubuntu)${install_hint:-}"
  fi
}

# Runs a server binary as the cluster's owner: ourselves, or `postgres` when we are root.
as_owner() {
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
