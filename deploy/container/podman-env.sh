# Sourced by deploy/container/build.sh and deploy/compose/lib.sh: hosts whose cgroups are a
# v1+v2 hybrid (crun refuses them) or whose open-file limit is below podman's default container
# limit get containers.conf beside this file (runc, lower ulimits), unless CONTAINERS_CONF is set.
podman_host_settings() {
  local hard
  hard=$(ulimit -Hn)
  if [ -z "${CONTAINERS_CONF:-}" ] && { [ -d /sys/fs/cgroup/unified ] || { [ "$hard" != unlimited ] && [ "$hard" -lt 1048576 ]; }; }; then
    CONTAINERS_CONF=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/containers.conf
    export CONTAINERS_CONF
  fi
}
