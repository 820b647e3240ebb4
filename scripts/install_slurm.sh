#!/usr/bin/env bash
# Install a minimal SLURM (slurmctld + slurmd + client + munge) from the distribution's
# packages, for the `slurm`-marked tests (tests/launch/test_slurm.py: one node; test_slurm_multinode.py:
# two slurmd daemons on this machine) and for trying the sbatch
# wrappers in launchers/slurm/ on one machine. Idempotent: does nothing when the binaries are there.
# Skips (exit 0, with a message) when not root or without apt-get. No daemon is started here; the
# tests write their own slurm.conf and start/stop the daemons themselves (see docs/STAGE2_RUNBOOK.md).
#
#   sudo scripts/install_slurm.sh          # ~20 s, 8 packages on Debian 12 (no GTK, no slurmdbd)
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client munge)

have_all() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null
}

if have_all; then
    echo "install_slurm: slurmctld, slurmd, sbatch and munged already on PATH; nothing to do"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install_slurm: skipped (needs root for apt-get; run with sudo)" >&2
    exit 0
fi
if ! command -v apt-get >/dev/null; then
    echo "install_slurm: skipped (no apt-get on this system; install ${PACKAGES[*]} with your package manager)" >&2
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# --no-install-recommends: `slurm-wlm` would pull 43 packages incl. sview/GTK; these 4 are enough.
# The postinst scripts print "invoke-rc.d: policy-rc.d denied execution of start" in containers: harmless.
apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}"
have_all && echo "install_slurm: installed ${PACKAGES[*]} ($(slurmctld -V 2>/dev/null || true))"
