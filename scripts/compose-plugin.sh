#!/usr/bin/env bash
# Makes `docker compose` available for the tests that validate docker/compose.yaml with
# `docker compose config` (no Docker engine needed: the client and its Compose v2 plugin parse
# and resolve the file). The machine has the docker client but not the plugin, so the plugin is
# built once from the Go module proxy with the machine's Go (about 3-4 minutes on 2 cores) and
# cached in ~/.cache/mtlstream; later runs only link it. Idempotent; does nothing when
# `docker compose` already works.
set -euo pipefail

VERSION=${MTL_COMPOSE_VERSION:-v2.40.3}
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/mtlstream/compose-$VERSION
PLUGINS=${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins

log() { printf '[setup] %s\n' "$*" >&2; }

command -v docker >/dev/null || { log "no docker client: docker/compose.yaml cannot be validated"; exit 0; }
docker compose version >/dev/null 2>&1 && exit 0

if [[ ! -x $CACHE/docker-compose ]]; then
  command -v go >/dev/null || { log "no Go toolchain to build the Compose plugin"; exit 0; }
  log "building the Docker Compose $VERSION plugin from the Go module proxy (once, a few minutes)"
  work=$(mktemp -d)
  trap 'chmod -R u+w "$work" 2>/dev/null; rm -rf "$work"' EXIT
  export GOMODCACHE=$work/mod GOCACHE=$work/cache GOFLAGS=-mod=mod
  # `go install module@version` refuses a module whose go.mod has exclude directives: build
  # inside a copy of the module instead
  dir=$(go mod download -json "github.com/docker/compose/v2@$VERSION" \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["Dir"])')
  cp -r "$dir" "$work/src" && chmod -R u+w "$work/src"
  mkdir -p "$CACHE"
  (cd "$work/src" && go build -trimpath -ldflags="-s -w -X github.com/docker/compose/v2/internal.Version=$VERSION" -o "$CACHE/docker-compose.tmp" ./cmd)
  mv "$CACHE/docker-compose.tmp" "$CACHE/docker-compose"
fi
mkdir -p "$PLUGINS"
ln -sf "$CACHE/docker-compose" "$PLUGINS/docker-compose"
docker compose version >&2
