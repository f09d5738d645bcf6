#!/usr/bin/env bash
# The QuPath extension's Java core is built and tested with Debian's JDK, gson and JUnit 5 (no Maven):
# install them quietly, only when missing.
set -euo pipefail
if ! command -v javac >/dev/null 2>&1 || ! command -v java >/dev/null 2>&1 \
        || [ ! -f /usr/share/java/gson.jar ] || [ ! -f /usr/share/java/junit-platform-console-standalone.jar ]; then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq >/dev/null
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        default-jdk-headless libgoogle-gson-java junit5 >/dev/null
fi
