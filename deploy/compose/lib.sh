# Sourced by up.sh and down.sh: picks the container engine and compose tool.
#   OH_COMPOSE="podman-compose" (or "docker compose", "docker-compose") forces a choice.
# Sets ENGINE (docker|podman) and COMPOSE (array), and PROJECT (compose project name).
PROJECT=${OH_COMPOSE_PROJECT:-openhands}
# shellcheck source=../container/podman-env.sh
. "$(dirname "${BASH_SOURCE[0]}")/../container/podman-env.sh"
pick_compose() {
  if [ -n "${OH_COMPOSE:-}" ]; then
    read -r -a COMPOSE <<<"$OH_COMPOSE"
    case "${COMPOSE[0]}" in podman*) ENGINE=podman; podman_host_settings ;; *) ENGINE=docker ;; esac
    return 0
  fi
  # docker only if its daemon answers (the CLI alone may be installed without one).
  if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
    ENGINE=docker
    if docker compose version >/dev/null 2>&1; then COMPOSE=(docker compose); return 0; fi
    if command -v docker-compose >/dev/null 2>&1; then COMPOSE=(docker-compose); return 0; fi
  fi
  if command -v podman >/dev/null 2>&1 && command -v podman-compose >/dev/null 2>&1; then
    ENGINE=podman
    COMPOSE=(podman-compose)
    podman_host_settings
    return 0
  fi
  echo "compose: need docker (with a running daemon) and docker compose/docker-compose, or podman and podman-compose" >&2
  return 1
}
