# Shared by lab/up, lab/destroy and lab/vagrant: where the lab lives and how to reach it.
# The lab runs inside the network namespace $LAB_NS, against a libvirtd (and virtlogd) of its
# own (lab/ns-libvirtd), started in a private mount namespace where /etc/libvirt, /var/lib/libvirt,
# /var/cache/libvirt, /var/log/libvirt and /run/libvirt are bind mounts of $LAB_DIR/*.
# Its sockets are in $LAB_RUN, reachable from the root namespace (libvirt URI $LAB_URI);
# its networks, their dnsmasq and the hosts' addresses exist only inside $LAB_NS.
# shellcheck shell=bash

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LAB_NS=${HVAGENT_LAB_NS:-hvlab}
LAB_DIR=${HVAGENT_LAB_DIR:-/var/lib/hvlab}
LAB_RUN=/run/$LAB_NS
LAB_URI="qemu:///system?socket=$LAB_RUN/libvirt-sock"
LAB_BOX_NAME=hvhost-bookworm
LAB_BOX=${HVAGENT_LAB_BOX_FILE:-$REPO/images/cache/out/$LAB_BOX_NAME.box}
# The domain type: KVM cannot run guests on every machine (nested, CI); `qemu` is TCG.
export HVAGENT_LAB_DRIVER=${HVAGENT_LAB_DRIVER:-qemu}
export HVAGENT_LAB_HOSTS=${HVAGENT_LAB_HOSTS:-2}

log() { printf '%s: %s\n' "${0##*/}" "$*" >&2; }
die() { log "error: $*"; exit 1; }

lab_virsh() { virsh -q -c "$LAB_URI" "$@"; }

# A libvirtd of lab/ns-libvirtd answers on the sockets in the directory $1.
ns_libvirtd_answers() { [ -S "$1/libvirt-sock" ] && timeout 10 virsh -c "qemu:///system?socket=$1/libvirt-sock" version >/dev/null 2>&1; }

lab_libvirtd_up() { ns_libvirtd_answers "$LAB_RUN"; }

lab_ns_exists() { [ -e "/run/netns/$LAB_NS" ]; }

# Vagrant inside the namespace, with the lab's own Vagrant home and machine state.
# LAB_TIMEOUT: seconds before it is killed (default 0: none).
lab_vagrant() {
    timeout "${LAB_TIMEOUT:-0}" ip netns exec "$LAB_NS" env \
        VAGRANT_CWD="$REPO" VAGRANT_HOME="$LAB_DIR/vagrant.d" VAGRANT_DOTFILE_PATH="$LAB_DIR/vagrant" \
        VAGRANT_DEFAULT_PROVIDER=libvirt HVAGENT_LAB_LIBVIRT_URI="$LAB_URI" \
        ANSIBLE_FORCE_COLOR=0 \
        vagrant "$@"
}

pid_alive() { [ -n "$1" ] && kill -0 "$1" 2>/dev/null; }

# Stop one process we started: TERM, then KILL after $2 seconds (default 10).
stop_pid() {
    local pid=$1 wait=${2:-10} i
    pid_alive "$pid" || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < wait * 10; i++)); do pid_alive "$pid" || return 0; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
}

elapsed() { echo $(( $(date +%s) - $1 )); }
