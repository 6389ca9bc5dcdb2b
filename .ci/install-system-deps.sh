#!/usr/bin/env bash
# Install the system packages the system tests (tests/system/) need: OpenSSH server/client,
# PostgreSQL server/client, nginx with its stream module (a real PROXY protocol consumer),
# iproute2 + nftables + a C toolchain (the fault tests in tests/faults/: hosts in network
# namespaces, loss with nftables, delay with benchmarks/tools/netdelay.c; they also need root
# and /dev/net/tun, and fail under CI=true without them), systemd (only for
# `systemd-analyze verify` of contrib/systemd/; nothing runs systemd as init) and tmux (a
# pseudo-terminal for the client's live console test).
# Run as root on Debian 12 after `apt-get update`. Services are NOT started or enabled here:
# the tests start throwaway sshd / postgres / nginx instances of their own on loopback ports.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive

if [ "$(id -u)" -ne 0 ]; then
    echo "install-system-deps.sh: must run as root" >&2
    exit 2
fi

# Keep package post-install scripts from starting services (sshd, postgresql) on machines
# with an init system; policy-rc.d exit code 101 means "action not allowed".
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy"
    chmod 0755 "$policy"
    created_policy=1
fi
cleanup() {
    if [ "$created_policy" -eq 1 ]; then
        rm -f "$policy"
    fi
}
trap cleanup EXIT

apt-get install -y --no-install-recommends -o DPkg::Lock::Timeout=600 \
    openssh-server openssh-client \
    postgresql postgresql-client \
    nginx libnginx-mod-stream \
    iproute2 nftables \
    gcc libc6-dev \
    systemd \
    tmux

# sshd refuses to start without its privilege-separation directory.
mkdir -p /run/sshd
chmod 0755 /run/sshd
