#!/usr/bin/env bash
# Installs the offline assets the demo and the tests use, from Debian packages when run as root:
#  - dataset-fashion-mnist: real labelled images for the demo and tests;
#  - chromium: a headless browser that renders `finegrained report` pages in the tests;
#  - slurm-wlm and munge: a one-node SLURM cluster that the `finegrained launch` tests start and stop themselves.
# EfficientNet-Lite0 ImageNet weights come with the pip packages in setup.cfg. Without root (or apt-get) it
# says what is missing; the tests that need it are skipped with that reason.
set -u
FMNIST=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
missing=()
[ -f "$FMNIST" ] || missing+=(dataset-fashion-mnist)
command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || missing+=(chromium)
command -v slurmctld >/dev/null 2>&1 || [ -x /usr/sbin/slurmctld ] || missing+=(slurm-wlm)
command -v munged >/dev/null 2>&1 || [ -x /usr/sbin/munged ] || missing+=(munge)
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "Installing Debian packages: ${missing[*]} (offline assets for the demo and the tests)..."
  if (apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1 \
      || (apt-get update -qq >/dev/null 2>&1 \
          && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null)); then
    exit 0
  fi
  echo "WARNING: apt-get could not install ${missing[*]}." >&2
else
  echo "NOTE: ${missing[*]} missing and this user cannot apt-get install them." >&2
fi
cat >&2 <<MSG
Not installed from Debian: ${missing[*]}. Either run (as root)
    apt-get install ${missing[*]}
or do without: Fashion-MNIST is downloaded by torchvision on first use (needs internet), and the tests that need
the files, the browser or SLURM are skipped with this reason.
MSG
exit 0
