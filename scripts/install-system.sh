#!/usr/bin/env bash
# Installs the Debian packages the test suite needs, if they are missing:
#   dataset-fashion-mnist  the original Fashion-MNIST files under /usr/share/datasets/fashion-mnist
#   chromium               headless browser that renders the HTML report in its test
set -euo pipefail
need=()
[ -d /usr/share/datasets/fashion-mnist ] || need+=(dataset-fashion-mnist)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v npm >/dev/null 2>&1 || need+=(npm)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
