#!/usr/bin/env bash
# Build the aarch64 test environment that edgestack.targets.emulate.AArch64Emulator uses:
# an arm64 Debian CPython run by qemu-aarch64-static, with aarch64 numpy and onnxruntime.
#
#   scripts/setup-arm-env.sh          # or: make arm-env
#
# Layout (default ENV_DIR=<repo>/.cache/arm64, or $EDGESTACK_ARM_ENV):
#   sysroot/        arm64 .debs unpacked with dpkg -x; given to qemu as -L
#   site-packages/  aarch64 wheels unzipped; the emulated python's PYTHONPATH
#   downloads/      the .debs and wheels (wheels are kept and reused when their hash matches)
#   READY           written last, only after the smoke test passed: the pins and versions
#
# Idempotent: when READY already holds this script's pins, it does nothing. Needs root (or
# passwordless sudo) only to install qemu-user-static and to add the arm64 dpkg architecture.
# Network: the Debian archive (apt-get) and the Python package index (pip) only.
#
# Why the fake /proc/cpuinfo: onnxruntime >= 1.28 links pytorch/cpuinfo, which parses
# /proc/cpuinfo at import. Under qemu-user 7.2 that file is the x86 host's, and cpuinfo
# segfaults on it (seen with 1.28 to 1.32). qemu -L serves <sysroot>/proc/cpuinfo instead, so
# we write one describing Cortex-A76 cores, matching the `-cpu cortex-a76` we run qemu with.
set -euo pipefail

# ---- pins (change these and the next run rebuilds) -------------------------------------
ORT_VERSION=1.32.0
ORT_SHA256=2303372a85299b6757b0e11e1cbf13e410ddf7e10c37f4b37e99d1c90e7daf7c
NUMPY_VERSION=2.4.6
NUMPY_SHA256=0ab0a9c4ffb1a6d95ef519fe4247dba8eb6b18ad93999f76b7f657039acabd47
PY_VERSION=3.11                      # Debian 12 (bookworm) ships python3.11
WHEEL_PLATFORM=manylinux_2_28_aarch64
QEMU_CPU=cortex-a76                  # Raspberry Pi 5 class; ARMv8.2 + dot product, no SVE
LAYOUT=1                             # bump when the folder layout or cpuinfo changes
DEBS=(python3.11-minimal libpython3.11-minimal libpython3.11-stdlib libc6 libexpat1 zlib1g
      libffi8 libssl3 libstdc++6 libgcc-s1 libbz2-1.0 liblzma5 libsqlite3-0 libncursesw6
      libtinfo6 libreadline8 libuuid1 libcrypt1 libdb5.3 libgomp1 libnsl2 libtirpc3)
PINS="pins=onnxruntime==$ORT_VERSION numpy==$NUMPY_VERSION python$PY_VERSION"
PINS+=" cpu=$QEMU_CPU layout=$LAYOUT"

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ENV_DIR=${EDGESTACK_ARM_ENV:-$REPO/.cache/arm64}
START=$SECONDS

say() { printf '[arm-env] %s\n' "$*"; }
die() {  # die WHAT WHY FIX
    printf '[arm-env] ERROR: %s\n  why: %s\n  fix: %s\n' "$1" "$2" "$3" >&2
    exit 1
}

# ---- fast path ----------------------------------------------------------------------------
exit_if_ready() {
    if [[ -f $ENV_DIR/READY ]] && [[ $(head -n1 "$ENV_DIR/READY") == "$PINS" ]] \
            && command -v qemu-aarch64-static >/dev/null; then
        say "up to date: $ENV_DIR ($(head -n1 "$ENV_DIR/READY"))"
        exit 0
    fi
}
exit_if_ready
mkdir -p "$ENV_DIR"
exec 9>"$ENV_DIR/.lock"
flock 9 || die "cannot lock $ENV_DIR/.lock" "another setup may hold it" "wait, then rerun"
exit_if_ready  # a concurrent run may have finished the build while we waited

# ---- privileged steps: qemu-user-static and the arm64 architecture ----------------------
SUDO=()
need_root() {  # need_root WHAT
    if [[ $(id -u) -eq 0 ]]; then return; fi
    if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO=(sudo -n); return; fi
    die "$1 needs root" "not running as root and no passwordless sudo" \
        "run this script as root once (sudo $0), or do it by hand: $2"
}
APT_OPTS=(-q -o DPkg::Lock::Timeout=300)
apt_root() {  # apt-get as root, never prompting
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive DEBCONF_NOWARNINGS=yes \
        apt-get "${APT_OPTS[@]}" "$@"
}
apt_updated=0
apt_update() {
    [[ $apt_updated -eq 1 ]] && return
    say "apt-get update"
    # Unreachable third-party sources make apt-get update fail while Debian's indexes are fine;
    # whether what we need became available is checked by the caller.
    apt_root update >/dev/null \
        || say "warning: apt-get update reported errors (continuing; checked below)"
    apt_updated=1
}
has_candidate() {  # not `apt-cache | grep -q`: with pipefail, grep's early exit fails the pipe
    local policy
    policy=$(apt-cache policy "$1" 2>/dev/null || true)
    [[ $policy == *"Candidate: "[!\(]* ]]
}

if ! command -v qemu-aarch64-static >/dev/null; then
    need_root "installing qemu-user-static" "apt-get install qemu-user-static"
    has_candidate qemu-user-static || apt_update
    say "installing qemu-user-static"
    apt_root install -y --no-install-recommends qemu-user-static >/dev/null \
        || die "apt-get install qemu-user-static failed" "see apt's messages above" \
               "check that the Debian archive is reachable, then rerun"
    command -v qemu-aarch64-static >/dev/null \
        || die "qemu-aarch64-static not found after installing qemu-user-static" \
               "the package layout differs from Debian 12's" "install qemu-user-static by hand"
fi

if [[ $'\n'$(dpkg --print-foreign-architectures)$'\n' != *$'\n'arm64$'\n'* ]]; then
    need_root "adding the arm64 dpkg architecture" \
        "dpkg --add-architecture arm64 && apt-get update"
    say "dpkg --add-architecture arm64"
    "${SUDO[@]}" dpkg --add-architecture arm64
    apt_updated=0
    apt_update
fi
if ! has_candidate "python$PY_VERSION-minimal:arm64"; then
    need_root "apt-get update" "apt-get update"
    apt_update
fi
if ! has_candidate "python$PY_VERSION-minimal:arm64"; then
    # shellcheck disable=SC1091
    os=$(. /etc/os-release && echo "$PRETTY_NAME")
    die "no arm64 package python$PY_VERSION-minimal in the apt indexes" \
        "this script expects Debian 12 (bookworm) package names; this machine is: $os" \
        "on bookworm check that the Debian sources list arm64 (or has no Architectures: line)"
fi

# ---- host python with pip (only to download wheels and unzip them) ------------------------
HOST_PY=""
for cand in "${PYTHON:-}" "$REPO/.venv/bin/python" python3; do
    [[ -n $cand ]] || continue
    if "$cand" -m pip --version >/dev/null 2>&1; then HOST_PY=$cand; break; fi
done
[[ -n $HOST_PY ]] || die "no host Python with pip" \
    "pip is needed to download the aarch64 wheels" \
    "run 'make venv' (or apt-get install python3-pip)"

# ---- rebuild ---------------------------------------------------------------------------
say "building $ENV_DIR"
rm -f "$ENV_DIR/READY"
rm -rf "$ENV_DIR/sysroot" "$ENV_DIR/site-packages" "$ENV_DIR/downloads/debs"
mkdir -p "$ENV_DIR/sysroot" "$ENV_DIR/site-packages" "$ENV_DIR/downloads/debs" \
         "$ENV_DIR/downloads/wheels"

say "downloading ${#DEBS[@]} arm64 .debs"
(
    cd "$ENV_DIR/downloads/debs"
    # As root apt drops to user _apt, which cannot write here; download as the caller instead.
    sandbox=()
    [[ $(id -u) -eq 0 ]] && sandbox=(-o APT::Sandbox::User=root)
    apt-get "${APT_OPTS[@]}" "${sandbox[@]}" download "${DEBS[@]/%/:arm64}" >/dev/null
) || die "apt-get download of the arm64 .debs failed" "see apt's messages above" \
         "run 'apt-get update' as root, check that the Debian archive is reachable, then rerun"
for deb in "$ENV_DIR"/downloads/debs/*.deb; do
    dpkg -x "$deb" "$ENV_DIR/sysroot"
done
ARM_PY=$ENV_DIR/sysroot/usr/bin/python$PY_VERSION
[[ -x $ARM_PY ]] || die "$ARM_PY missing after unpacking" \
    "python$PY_VERSION-minimal:arm64 did not provide it" "delete $ENV_DIR and rerun"

# The fake /proc/cpuinfo (see the header): one entry per host CPU, Cortex-A76 (part 0xd0b).
mkdir -p "$ENV_DIR/sysroot/proc"
features="fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm"
features+=" lrcpc dcpop asimddp"
for ((i = 0; i < $(nproc); i++)); do
    printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: %s\n' "$i" "$features"
    printf 'CPU implementer\t: 0x41\n'
    printf 'CPU architecture: 8\nCPU variant\t: 0x4\nCPU part\t: 0xd0b\nCPU revision\t: 1\n\n'
done >"$ENV_DIR/sysroot/proc/cpuinfo"

fetch_wheel() {  # fetch_wheel NAME VERSION SHA256
    local name=$1 version=$2 sha=$3 whl found
    found=("$ENV_DIR"/downloads/wheels/"$name-$version"-*.whl)
    whl=${found[0]}
    if [[ ! -f $whl ]] || ! echo "$sha  $whl" | sha256sum --quiet -c - 2>/dev/null; then
        say "downloading $name==$version ($WHEEL_PLATFORM)"
        rm -f "$ENV_DIR"/downloads/wheels/"$name-$version"-*.whl
        "$HOST_PY" -m pip download --quiet --disable-pip-version-check --no-deps \
            --only-binary=:all: --platform "$WHEEL_PLATFORM" --python-version "$PY_VERSION" \
            --implementation cp --abi "cp${PY_VERSION/./}" \
            -d "$ENV_DIR/downloads/wheels" "$name==$version" \
            || die "pip download $name==$version for $WHEEL_PLATFORM failed" \
                   "see pip's message above" "check that the package index is reachable, then rerun"
        found=("$ENV_DIR"/downloads/wheels/"$name-$version"-*.whl)
        whl=${found[0]}
        echo "$sha  $whl" | sha256sum --quiet -c - 2>/dev/null \
            || die "$(basename "$whl") has an unexpected sha256" \
                   "expected $sha, found $(sha256sum "$whl" | cut -d' ' -f1)" \
                   "if the pin was changed on purpose, update the *_SHA256 pins in $0"
    fi
    "$HOST_PY" -m zipfile -e "$whl" "$ENV_DIR/site-packages"
}
fetch_wheel numpy "$NUMPY_VERSION" "$NUMPY_SHA256"
fetch_wheel onnxruntime "$ORT_VERSION" "$ORT_SHA256"

QEMU_VERSION=$(qemu-aarch64-static --version)
QEMU_VERSION=${QEMU_VERSION%%$'\n'*}             # "qemu-aarch64 version 7.2.22 (Debian ...)"
QEMU_VERSION=${QEMU_VERSION#qemu-aarch64 version }
QEMU_VERSION=${QEMU_VERSION%% *}

# ---- smoke test: import, run a tiny MatMul+Add+Relu model, report versions ----------------
# Run with bytecode writing on, so the .pyc files it creates make later starts faster.
say "smoke test under qemu-aarch64-static -cpu $QEMU_CPU (about 10-30 s)"
smoke_log=$ENV_DIR/smoke.log
if ! env -i PATH="$PATH" LANG=C.UTF-8 PYTHONPATH="$ENV_DIR/site-packages" \
        qemu-aarch64-static -cpu "$QEMU_CPU" -L "$ENV_DIR/sysroot" "$ARM_PY" -S - \
        >"$ENV_DIR/versions.txt" 2>"$smoke_log" <<'EOF'
import base64, json, platform, sys, tempfile, zipfile  # noqa: F401  (warm the .pyc cache)
import numpy as np
import onnxruntime as ort
model = base64.b64decode(
    "CAcSD2VkZ2VzdGFjay1zZXR1cDqaAQoRCgFYCgFXEgFNIgZNYXRNdWwKDgoBTQoBQhIBQSIDQWRkCgwKAUESAVki"
    "BFJlbHUSBXNtb2tlKiMIAwgCEAFCAVdKGAAAgD8AAADAAABAQAAAgEAAAKDAAADAQCoRCAIQAUIBQkoIAAAAPwAA"
    "AL9aEwoBWBIOCgwIARIICgIIAgoCCANiEwoBWRIOCgwIARIICgIIAgoCCAJCBAoAEA0=")
x = np.array([[1, 2, 3], [-1, 0.5, 2]], np.float32)
w = np.array([[1, -2], [3, 4], [-5, 6]], np.float32)
want = np.maximum(x @ w + np.array([0.5, -0.5], np.float32), 0)
so = ort.SessionOptions()
so.intra_op_num_threads = 1
got = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"]).run(None, {"X": x})[0]
assert np.allclose(got, want, atol=1e-6), (got, want)
assert platform.machine() == "aarch64", platform.machine()
print(f"python={platform.python_version()}")
print(f"numpy={np.__version__}")
print(f"onnxruntime={ort.__version__}")
print(f"machine={platform.machine()}")
EOF
then
    die "the smoke test failed under emulation (log: $smoke_log)" \
        "$(tail -n 5 "$smoke_log" | tr '\n' ' ')" \
        "onnxruntime $ORT_VERSION may not run under qemu $QEMU_VERSION; try another
       ORT_VERSION pin in $0 (1.19 to 1.32 ran under qemu 7.2), or delete $ENV_DIR and rerun"
fi

{
    echo "$PINS"
    cat "$ENV_DIR/versions.txt"
    echo "qemu_cpu=$QEMU_CPU"
    echo "qemu=$QEMU_VERSION"
} >"$ENV_DIR/READY.tmp"
rm -f "$ENV_DIR/versions.txt"
mv "$ENV_DIR/READY.tmp" "$ENV_DIR/READY"
say "ready in $((SECONDS - START)) s: $ENV_DIR"
sed 's/^/[arm-env]   /' "$ENV_DIR/READY"
