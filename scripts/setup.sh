#!/usr/bin/env bash
# Installs everything csn needs on a fresh Debian machine: Fashion-MNIST (Debian package), Chromium
# (to check the HTML report in a real browser), a CPU build of PyTorch, and csn with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq dataset-fashion-mnist chromium >/dev/null
# Pin the CPU build here; pyproject only asks for torch>=2.3 so GPU users keep their own build.
python3 -m pip install -q --disable-pip-version-check torch==2.13.0
python3 -m pip install -q --disable-pip-version-check -e '.[test]'
# pyenv installs console scripts behind shims that need a rehash to appear on PATH
if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi
echo "csn installed: $(command -v csn)"
