#!/usr/bin/env bash
# The demo tests drive Debian's chromium with Playwright (Playwright's own browser download is not
# used). Installs it when no chromium is on the PATH; needs root or sudo for apt-get.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-browser: no chromium and no apt-get; install a chromium browser and put it on PATH" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
echo "install-browser: installing Debian's chromium (about a minute)" >&2
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
