#!/usr/bin/env bash
# The QuPath 0.6 check of the extension (make qupath-check): compiles the whole extension, QuPath layer
# included, against QuPath 0.6's jars with Java 21 and -Xlint:all -Werror, then runs its non-GUI path
# (QuPathCheck: the image through QuPath's ImageServer, points as QuPath point annotations, the job
# against a live server, the nuclei made by NucleusObjects) on a real image, and compares every nucleus
# with what `nuclick-bridge segment` gets for the same clicks from the same server.
#
#   scripts/qupath_check.sh IMAGE [POINTS.csv]
#
# IMAGE: an 8-bit RGB image, e.g. /work/shared/data/monuseg/images/TCGA-18-5592-01Z-00-DX1.png.
# POINTS.csv (x,y[,class]): optional when IMAGE has an instance label map at ../labels/<same name>
# (the MoNuSeg layout); then one click inside each of NUCLICK_QUPATH_CHECK_CLICKS nuclei (default 80),
# every other one in class "Tumor".  An image without a pixel size gets NUCLICK_QUPATH_CHECK_PIXEL_UM
# (default 0.25 µm, MoNuSeg's 40x), as a user sets it in QuPath's Image tab.
#
# Needs: Gradle 8.x (qupath_extension/gradlew if you made one, else `gradle` on PATH), a JDK 21 that
# Gradle can find (or download), network access (Gradle fetches QuPath 0.6 from the SciJava Maven
# repository), and this repository's venv (.venv, or set NUCLICK_BRIDGE and PYTHON).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-$root/.venv/bin/python}"
NUCLICK_BRIDGE="${NUCLICK_BRIDGE:-$root/.venv/bin/nuclick-bridge}"
CLICKS="${NUCLICK_QUPATH_CHECK_CLICKS:-80}"

image="${1:-}"
points="${2:-}"
if [ -z "$image" ] || [ $# -gt 2 ]; then
    sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
[ -f "$image" ] || { echo "qupath-check: no image at $image" >&2; exit 2; }
image="$(cd "$(dirname "$image")" && pwd)/$(basename "$image")"

if [ -x "$root/qupath_extension/gradlew" ]; then
    gradle_cmd=("$root/qupath_extension/gradlew")
elif command -v gradle >/dev/null 2>&1; then
    gradle_cmd=(gradle)
else
    echo "qupath-check: needs Gradle 8.x (gradle on PATH, or qupath_extension/gradlew: 'gradle wrapper' once)" >&2
    exit 3
fi
for tool in "$PYTHON" "$NUCLICK_BRIDGE"; do
    [ -x "$tool" ] || { echo "qupath-check: missing $tool (make install, or set PYTHON/NUCLICK_BRIDGE)" >&2; exit 3; }
done

work="$(mktemp -d "${TMPDIR:-/tmp}/qupath-check.XXXXXX")"
server_pid=""
cleanup() {
    if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
        kill "$server_pid"
        wait "$server_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

if [ -z "$points" ]; then
    labels="$(dirname "$(dirname "$image")")/labels/$(basename "$image")"
    [ -f "$labels" ] || { echo "qupath-check: no POINTS.csv given and no label map at $labels" >&2; exit 2; }
    points="$work/points.csv"
    "$PYTHON" - "$labels" "$points" "$CLICKS" <<'EOF'
import csv
import sys

import numpy as np
from PIL import Image

from bridge.evaluation.clicks import simulate_clicks

labels = np.asarray(Image.open(sys.argv[1]))
xy, _ = simulate_clicks(labels, jitter=0.0, seed=0)
n = int(sys.argv[3])
take = np.linspace(0, len(xy) - 1, num=min(n, len(xy))).round().astype(int)
with open(sys.argv[2], "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["x", "y", "class"])
    for i, k in enumerate(take):
        w.writerow([f"{xy[k, 0]:.3f}", f"{xy[k, 1]:.3f}", "Tumor" if i % 2 else ""])
print(f"qupath-check: {len(take)} clicks from {sys.argv[1]}")
EOF
fi

# A real server on 127.0.0.1, with a token, on free ports.
"$PYTHON" -c 'import secrets; print(secrets.token_hex(16))' > "$work/token"
read -r grpc_port http_port < <("$PYTHON" - <<'EOF'
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
EOF
)
"$NUCLICK_BRIDGE" serve --host 127.0.0.1 --port "$grpc_port" --http-port "$http_port" \
    --token-file "$work/token" > "$work/serve.log" 2>&1 &
server_pid=$!
token="$(cat "$work/token")"
ready=0
for _ in $(seq 1 240); do
    if ! kill -0 "$server_pid" 2>/dev/null; then
        echo "qupath-check: nuclick-bridge serve exited:" >&2
        cat "$work/serve.log" >&2
        exit 1
    fi
    if "$PYTHON" - "$http_port" "$token" <<'EOF' 2>/dev/null; then
import sys
import urllib.request

req = urllib.request.Request(f"http://127.0.0.1:{sys.argv[1]}/v1/model",
                             headers={"authorization": f"Bearer {sys.argv[2]}"})
urllib.request.urlopen(req, timeout=2).read()
EOF
        ready=1
        break
    fi
    sleep 0.5
done
if [ "$ready" != 1 ]; then
    echo "qupath-check: nuclick-bridge serve did not answer on 127.0.0.1:$http_port within 2 minutes:" >&2
    cat "$work/serve.log" >&2
    exit 1
fi
echo "qupath-check: nuclick-bridge serve on 127.0.0.1 (gRPC $grpc_port, HTTP $http_port)"

# The Python client's answer for the same clicks from the same server: what every nucleus is compared to.
NUCLICK_BRIDGE_TOKEN="$token" "$NUCLICK_BRIDGE" segment "$image" --points "$points" \
    --out "$work/expected.geojson" --server "127.0.0.1:$grpc_port"

NUCLICK_E2E_URL="http://127.0.0.1:$http_port" NUCLICK_E2E_TOKEN="$token" \
    "${gradle_cmd[@]}" -p "$root/qupath_extension" --console=plain compileJava compileTestJava qupathCheck \
    -PcheckImage="$image" -PcheckPoints="$points" -PcheckExpected="$work/expected.geojson"
