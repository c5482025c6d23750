#!/usr/bin/env bash
# Installs the offline assets the demo and the tests use.
#  - Fashion-MNIST (real labelled images) from Debian's `dataset-fashion-mnist`.
#  - EfficientNet-Lite0 ImageNet weights come with the pip packages in setup.cfg.
set -u
FMNIST=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ -f "$FMNIST" ]; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "Installing Debian package dataset-fashion-mnist (real Fashion-MNIST images for the demo and tests)..."
  if (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
      || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null)); then
    exit 0
  fi
  echo "WARNING: apt-get could not install dataset-fashion-mnist." >&2
else
  echo "NOTE: $FMNIST is missing and this user cannot apt-get install it." >&2
fi
cat >&2 <<MSG
Fashion-MNIST is not installed from Debian. Either run (as root)
    apt-get install dataset-fashion-mnist
or let torchvision download it on first use (needs internet).
Tests that need it are skipped with this reason; the demo will try the download.
MSG
exit 0
