#!/usr/bin/env bash
# Build and test the extension's plain-Java core without Gradle, QuPath or a Maven repository:
# the machine's javac (--release 17) against Debian's gson and JUnit 5 jars
# (apt-get install default-jdk-headless libgoogle-gson-java junit5).
#
#   qupath_extension/javatest.sh check          # exit 3 with a message when javac/java/jars are missing
#   qupath_extension/javatest.sh build          # compile core + tests into build/javatest (cached)
#   qupath_extension/javatest.sh test [ARGS]    # build, then run JUnit (ARGS: console launcher selectors;
#                                               # default: every test class; the end-to-end test skips
#                                               # itself unless NUCLICK_E2E_URL is set)
#
# Overrides: GSON_JAR, JUNIT_JAR (the junit-platform-console-standalone jar), NUCLICK_JAVA_BUILD.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
GSON_JAR="${GSON_JAR:-/usr/share/java/gson.jar}"
JUNIT_JAR="${JUNIT_JAR:-/usr/share/java/junit-platform-console-standalone.jar}"
OUT="${NUCLICK_JAVA_BUILD:-$here/build/javatest}"

check() {
    local missing=()
    command -v javac >/dev/null 2>&1 || missing+=("javac (apt-get install default-jdk-headless)")
    command -v java >/dev/null 2>&1 || missing+=("java (apt-get install default-jdk-headless)")
    [ -f "$GSON_JAR" ] || missing+=("$GSON_JAR (apt-get install libgoogle-gson-java)")
    [ -f "$JUNIT_JAR" ] || missing+=("$JUNIT_JAR (apt-get install junit5)")
    if [ ${#missing[@]} -gt 0 ]; then
        printf 'javatest: missing %s\n' "${missing[@]}" >&2
        exit 3
    fi
}

sources() {
    # The QuPath layer (qupath/ext/nuclick/*.java) needs QuPath and is built by Gradle only.
    find "$here/src/main/java/qupath/ext/nuclick/core" "$here/src/test/java" -name '*.java' | LC_ALL=C sort
}

build() {
    check
    local stamp
    stamp="$( { javac -version 2>&1; echo "$GSON_JAR $JUNIT_JAR"; sources | xargs sha256sum; } | sha256sum | cut -d' ' -f1)"
    if [ -f "$OUT/stamp" ] && [ "$(cat "$OUT/stamp")" = "$stamp" ]; then
        return 0
    fi
    mkdir -p "$(dirname "$OUT")"
    local tmp
    tmp="$(mktemp -d "$(dirname "$OUT")/.javatest.XXXXXX")"
    sources > "$tmp/sources.txt"
    if ! javac --release 17 -encoding UTF-8 -Werror -d "$tmp/classes" \
            -Xlint:deprecation,unchecked,rawtypes,cast,static,try,varargs,fallthrough,finally,divzero,empty,overrides \
            -cp "$GSON_JAR:$JUNIT_JAR" @"$tmp/sources.txt"; then
        rm -rf "$tmp"
        exit 1
    fi
    echo "$stamp" > "$tmp/stamp"
    rm -rf "$OUT.old"
    [ -d "$OUT" ] && mv "$OUT" "$OUT.old"
    mv "$tmp" "$OUT"
    rm -rf "$OUT.old"
}

run_tests() {
    build
    local args=("$@") a selected=0
    for a in "$@"; do
        case "$a" in --select*|--scan-class-path*|-c|-m|-p|-d|-f|-u|-o) selected=1 ;; esac
    done
    [ "$selected" = 1 ] || args+=("--scan-class-path=$OUT/classes")
    exec java -jar "$JUNIT_JAR" --disable-banner --details=tree --fail-if-no-tests \
        --class-path "$OUT/classes:$GSON_JAR" "${args[@]}"
}

cmd="${1:-test}"
[ $# -gt 0 ] && shift
case "$cmd" in
    check) check ;;
    build) build; echo "$OUT/classes" ;;
    test) run_tests "$@" ;;
    *) echo "usage: $0 check|build|test [JUnit console launcher args]" >&2; exit 2 ;;
esac
