#!/usr/bin/env bash
# A throwaway PostgreSQL for keelson's store and server tests.
#
#   eval "$(scripts/pg.sh start)"   # prints: export KEELSON_TEST_POSTGRES_URL=postgres://…
#   scripts/pg.sh stop
#
# `start` initialises a data directory under a temporary directory, starts the
# server on a free loopback port and prints the export line (also written to
# $KEELSON_PG_DIR/env). `stop` stops it and removes the directory. Installs
# Debian's postgresql package when no PostgreSQL binaries are found (as root).
# initdb and postgres refuse to run as root, so as root they run as `postgres`.
set -euo pipefail

PG_DIR="${KEELSON_PG_DIR:-${TMPDIR:-/tmp}/keelson-pg}"

log() { echo "pg.sh: $*" >&2; }

find_bin() {
    local dir
    dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    if [[ -z "$dir" && $(id -u) -eq 0 ]]; then
        log "installing postgresql"
        apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
        dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    fi
    [[ -n "$dir" ]] || { log "no PostgreSQL binaries under /usr/lib/postgresql"; exit 1; }
    echo "$dir"
}

as_pg() {
    if [[ $(id -u) -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

free_port() {
    local port tries=0
    while ((tries < 200)); do
        port=$((20000 + RANDOM % 40000))
        if ! port_in_use "$port"; then echo "$port"; return; fi
        tries=$((tries + 1))
    done
    log "no free port found"; exit 1
}

start() {
    local bin port url
    if [[ -f "$PG_DIR/env" ]] && [[ -f "$PG_DIR/data/postmaster.pid" ]]; then
        log "already running"
        cat "$PG_DIR/env"
        return
    fi
    bin=$(find_bin)
    rm -rf "$PG_DIR"
    mkdir -p "$PG_DIR"
    if [[ $(id -u) -eq 0 ]]; then
        id postgres >/dev/null 2>&1 || useradd --system --home-dir "$PG_DIR" postgres
        chown postgres "$PG_DIR"
    fi
    as_pg "$bin/initdb" -D "$PG_DIR/data" -U postgres --auth=trust -E UTF8 --no-sync >"$PG_DIR/initdb.log" 2>&1 \
        || { cat "$PG_DIR/initdb.log" >&2; exit 1; }
    for _ in 1 2 3 4 5; do
        port=$(free_port)
        if as_pg "$bin/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/postgres.log" -w -t 60 \
            -o "-p $port -k $PG_DIR -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c max_connections=300" \
            start >&2; then
            url="postgres://postgres@127.0.0.1:$port/postgres"
            echo "export KEELSON_TEST_POSTGRES_URL=$url" >"$PG_DIR/env"
            cat "$PG_DIR/env"
            return
        fi
        log "start on port $port failed, trying another"
    done
    cat "$PG_DIR/postgres.log" >&2
    exit 1
}

stop() {
    local bin
    if [[ -f "$PG_DIR/data/postmaster.pid" ]]; then
        bin=$(find_bin)
        as_pg "$bin/pg_ctl" -D "$PG_DIR/data" -m fast -w stop >&2 || true
    fi
    rm -rf "$PG_DIR"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
