#!/usr/bin/env bash
# The reverse-proxy test (tests/test_nginx_proxy.py) runs Debian's nginx from /usr/sbin/nginx as a
# plain process on 127.0.0.1: install nginx-light quietly, only when it is missing.
set -euo pipefail
if [ ! -x /usr/sbin/nginx ]; then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq >/dev/null
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx-light >/dev/null
    # Debian starts the packaged service on port 80 where it can; the tests run their own.
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet nginx 2>/dev/null; then
        $sudo systemctl disable --now nginx >/dev/null 2>&1 || true
    fi
fi
