#!/usr/bin/env bash
# Run HERE (a package index is reachable): downloads tox and every package it imports as pure-Python wheels
# for Python 3.12 into .carry/whl-tox, so that `tox -e cuda` runs on the lent GPU machine, which has no
# index and no tox. The versions are one set seen working together. diffusers, which the GPU image lacks,
# comes separately: ../shared/device/wheels.sh (into .carry/whl).
# THERE (name .carry in the run's carry list):  .ci/tox-offline -e cuda
set -euo pipefail
root=$(git rev-parse --show-toplevel)
dest="$root/.carry/whl-tox"
mkdir -p "$dest"
grep -qx '/.carry/' "$root/.git/info/exclude" 2>/dev/null || echo '/.carry/' >> "$root/.git/info/exclude"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 -d "$dest" \
  tox==4.67.15 virtualenv==21.15.11 pyproject-api==1.12.1 python-discovery==1.9.6 pluggy==1.6.0 \
  packaging==26.4 filelock==4.3.1 platformdirs==4.14.9 cachetools==8.0.2 colorama==0.4.6 tomli-w==1.2.0 \
  distlib==0.4.4 typing-extensions==4.16.0
ls -la "$dest"
