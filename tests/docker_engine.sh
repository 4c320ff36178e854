#!/usr/bin/env bash
# Start or stop a local Docker engine for test_in_container.py (CI and dev machines).
#
#   bash tests/docker_engine.sh start   # install (once), start dockerd, build the local base image
#   bash tests/docker_engine.sh base    # only (re)build the local base image if it is missing
#   bash tests/docker_engine.sh stop    # stop the dockerd that `start` started (by its PID)
#   bash tests/docker_engine.sh status
#
# Idempotent and fast when already done: an engine that already answers is used as is,
# an existing base image is kept. The engine runs WITHOUT a bridge network
# (--bridge=none --iptables=false --ip-masq=false): containers and builds must use
# `--network host`. Docker Hub is not reachable here, so the base image is made with
# debootstrap (Debian bookworm, Python 3.11 as the local CPU torch wheel needs).
#
# Exit codes: 0 ok; 1 the engine could not be installed/started (the container test
# then skips); 2 usage.
set -euo pipefail

BASE_IMAGE="${HCX_TEST_BASE_IMAGE:-hcx-test/python:3.11-bookworm}"
SUITE="${HCX_DEBIAN_SUITE:-bookworm}"
MIRROR="${HCX_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
STATE_DIR="${HCX_DOCKERD_STATE_DIR:-/run/hcx-dockerd}"
PID_FILE="$STATE_DIR/dockerd.pid"
LOG_FILE="${HCX_DOCKERD_LOG:-/tmp/hcx-dockerd.log}"
START_TIMEOUT="${HCX_DOCKERD_START_TIMEOUT:-60}"

log() { printf '[docker_engine] %s\n' "$*" >&2; }

engine_up() { timeout 10 docker info >/dev/null 2>&1; }

need_root() {
    if [ "$(id -u)" -ne 0 ]; then
        log "not root: cannot install or start a Docker engine here ($1)."
        exit 1
    fi
}

apt_install() {
    need_root "apt-get install $*"
    log "installing $* (apt-get)"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"; } >>"$LOG_FILE" 2>&1; then
        log "apt-get install $* failed; see $LOG_FILE"
        tail -n 20 "$LOG_FILE" >&2 || true
        exit 1
    fi
}

start_engine() {
    if engine_up; then
        log "engine already answers: $(docker version --format '{{.Server.Version}}' 2>/dev/null || echo '?')"
        return 0
    fi
    need_root "start dockerd"
    if ! command -v dockerd >/dev/null 2>&1 || ! command -v docker >/dev/null 2>&1; then
        # debootstrap too, in the same apt run: build_base needs it on a new machine.
        apt_install docker.io debootstrap
    fi
    mkdir -p "$STATE_DIR"
    if [ -f "$PID_FILE" ] && kill -0 "$(cat "$PID_FILE")" 2>/dev/null; then
        log "dockerd (pid $(cat "$PID_FILE")) is running but does not answer yet; waiting"
    else
        log "starting dockerd (no bridge network), log: $LOG_FILE"
        # setsid: the daemon gets its own session, so it outlives the caller's shell.
        setsid dockerd --bridge=none --iptables=false --ip-masq=false \
            --pidfile "$STATE_DIR/docker.pid" >>"$LOG_FILE" 2>&1 </dev/null &
        echo $! >"$PID_FILE"
    fi
    local waited=0
    until engine_up; do
        if ! kill -0 "$(cat "$PID_FILE")" 2>/dev/null; then
            log "dockerd exited; last lines of $LOG_FILE:"
            tail -n 20 "$LOG_FILE" >&2 || true
            rm -f "$PID_FILE"
            exit 1
        fi
        if [ "$waited" -ge "$START_TIMEOUT" ]; then
            log "dockerd did not answer within ${START_TIMEOUT}s; last lines of $LOG_FILE:"
            tail -n 20 "$LOG_FILE" >&2 || true
            exit 1
        fi
        sleep 1
        waited=$((waited + 1))
    done
    log "engine up after ${waited}s (pid $(cat "$PID_FILE"))"
}

build_base() {
    if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        log "base image $BASE_IMAGE present"
        return 0
    fi
    need_root "debootstrap"
    command -v debootstrap >/dev/null 2>&1 || apt_install debootstrap
    local rootfs
    rootfs="$(mktemp -d /tmp/hcx-rootfs.XXXXXX)"
    log "building $BASE_IMAGE with debootstrap ($SUITE, python3 + venv) into $rootfs"
    local t0=$SECONDS
    if ! debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        "$SUITE" "$rootfs" "$MIRROR" >>"$LOG_FILE" 2>&1; then
        log "debootstrap failed; see $LOG_FILE"
        tail -n 20 "$LOG_FILE" >&2 || true
        rm -rf "$rootfs"
        exit 1
    fi
    # Slim it a little: no apt lists or caches in the image.
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb
    tar -C "$rootfs" -c . | docker import \
        -c 'ENV LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        -c 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
    rm -rf "$rootfs"
    log "base image $BASE_IMAGE built in $((SECONDS - t0))s"
}

stop_engine() {
    if [ ! -f "$PID_FILE" ]; then
        log "no dockerd started by this script (no $PID_FILE); nothing to stop"
        return 0
    fi
    local pid
    pid="$(cat "$PID_FILE")"
    if kill -0 "$pid" 2>/dev/null; then
        log "stopping dockerd pid $pid"
        kill -TERM "$pid"
        local waited=0
        while kill -0 "$pid" 2>/dev/null && [ "$waited" -lt 30 ]; do
            sleep 1
            waited=$((waited + 1))
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "dockerd pid $pid still alive after 30s; sending KILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    else
        log "dockerd pid $pid is not running"
    fi
    rm -f "$PID_FILE"
}

case "${1:-}" in
    start)
        start_engine
        build_base
        ;;
    base)
        engine_up || { log "no engine answers; run: $0 start"; exit 1; }
        build_base
        ;;
    stop)
        stop_engine
        ;;
    status)
        if engine_up; then
            log "engine answers"
            if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
                log "base image $BASE_IMAGE present"
            else
                log "base image $BASE_IMAGE missing"
            fi
        else
            log "no engine answers"
            exit 1
        fi
        ;;
    *)
        echo "usage: $0 start|base|stop|status" >&2
        exit 2
        ;;
esac
