#!/usr/bin/env bash
# System packages the tests need, installed from Debian when missing (needs root or sudo):
# - chromium: the demo tests drive it with Playwright (Playwright's own browser download is not used);
# - cmake, g++, Boost, zlib, bzip2, lzma: `asr lm` builds KenLM's lmplz and build_binary from source;
# - espeak-ng, flite: text-to-speech engines for synthetic training speech.
set -euo pipefail
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v cmake >/dev/null 2>&1 || need+=(cmake)
command -v espeak-ng >/dev/null 2>&1 || need+=(espeak-ng)
command -v flite >/dev/null 2>&1 || need+=(flite)
command -v g++ >/dev/null 2>&1 || need+=(g++)
[ -e /usr/include/boost/program_options.hpp ] || need+=(libboost-program-options-dev)
[ -e /usr/include/boost/system/error_code.hpp ] || need+=(libboost-system-dev)
[ -e /usr/include/boost/thread.hpp ] || need+=(libboost-thread-dev)
[ -e /usr/include/boost/test/unit_test.hpp ] || need+=(libboost-test-dev)
[ -e /usr/include/zlib.h ] || need+=(zlib1g-dev)
[ -e /usr/include/bzlib.h ] || need+=(libbz2-dev)
[ -e /usr/include/lzma.h ] || need+=(liblzma-dev)
if [ ${#need[@]} -eq 0 ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-system-packages: missing ${need[*]} and no apt-get to install them" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
echo "install-system-packages: installing ${need[*]} (a minute or two)" >&2
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
