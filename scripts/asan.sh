#!/bin/bash
# The compiled packet path faces the Internet: build it once with
# AddressSanitizer and run the suites that feed it hostile bytes (the
# hostile-input and fuzz tests, the compiled checks against the Python ones
# (the packet cache's among them),
# the compiled loop on the Python classes' public interface, its hand-offs)
# against that build. An out-of-bounds read or write, a use after free,
# aborts the process that made it, router worker or test, and the run fails.
# Afterwards the ordinary build is put back, whatever happened.
set -euo pipefail
cd "$(dirname "$0")/.."
build() {
    .venv/bin/python setup.py -q build_ext --inplace --force
}
# The ordinary build, kept aside and copied back (a rebuild takes 20 s); built if there was none.
saved="$(mktemp -d)"
cp workers/_fastpath.*.so "$saved"/ 2>/dev/null || true
restore() {
    unset CFLAGS LDFLAGS
    if compgen -G "$saved/_fastpath.*.so" > /dev/null; then
        cp "$saved"/_fastpath.*.so workers/
    else
        build
    fi
    rm -rf "$saved"
    .venv/bin/python -c "from dnsrouter.workers import fastpath; m, why = fastpath.load(); assert m, why"
}
trap restore EXIT

export CFLAGS="-fsanitize=address -fno-omit-frame-pointer -g1 -O1" LDFLAGS="-fsanitize=address"
build
unset CFLAGS LDFLAGS
ldd workers/_fastpath.*.so | grep -q libasan || { echo "asan.sh: the module was built without ASan" >&2; exit 1; }
# Python is not built with ASan: its runtime comes first, for the module to
# find. Leak checks are off: CPython keeps memory until exit on purpose.
# abort_on_error: a report ends the process with a signal the tests see.
# DNSROUTER_PACKET_PATHS: the routers' tests on the compiled path only.
# DNSROUTER_MOST_EXAMPLES: each property test at most 300 examples here (the
# ordinary build runs them at full counts after; atheris and the hostile
# datagrams feed this build the most varied input).
LD_PRELOAD="$(gcc -print-file-name=libasan.so)" \
ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:print_summary=1" DNSROUTER_PACKET_PATHS=compiled \
DNSROUTER_MOST_EXAMPLES=300 \
    .venv/bin/pytest -q -p no:cacheprovider tests/test_fastpath.py tests/test_fastpath_seam.py \
    tests/test_fastpath_handoffs.py tests/test_cache_compiled.py tests/test_ratelimit.py tests/test_hostile.py \
    tests/test_fuzz.py "$@"
