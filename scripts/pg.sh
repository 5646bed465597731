#!/usr/bin/env bash
# A throwaway PostgreSQL for keelson's store and server tests.
#
#   eval "$(scripts/pg.sh start)"   # exports KEELSON_TEST_POSTGRES_URL and KEELSON_PG_DIR
#   scripts/pg.sh stop              # stops the server named by KEELSON_PG_DIR
#
# `start` initialises a data directory in a new temporary directory (or in
# $KEELSON_PG_DIR when set), starts the server on a free loopback port and
# prints the export lines, which it also writes to $KEELSON_PG_DIR/env and,
# for runs that did not eval them, to ${TMPDIR:-/tmp}/keelson-pg.current.
# Each start gets its own directory, so concurrent runs never stop each
# other's server. Installs Debian's postgresql package when no PostgreSQL
# binaries are found (as root). initdb and postgres refuse to run as root, so
# as root they run as `postgres`.
set -euo pipefail

TMP="${TMPDIR:-/tmp}"
CURRENT="$TMP/keelson-pg.current"

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
    local bin port dir
    bin=$(find_bin)
    if [[ -n "${KEELSON_PG_DIR:-}" ]]; then
        dir="$KEELSON_PG_DIR"
        if [[ -f "$dir/env" && -f "$dir/data/postmaster.pid" ]]; then
            log "already running in $dir"
            cat "$dir/env"
            return
        fi
        rm -rf "$dir"
        mkdir -p "$dir"
    else
        dir=$(mktemp -d "$TMP/keelson-pg.XXXXXX")
    fi
    if [[ $(id -u) -eq 0 ]]; then
        id postgres >/dev/null 2>&1 || useradd --system --home-dir "$dir" postgres
        chown postgres "$dir"
    fi
    as_pg "$bin/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --no-sync >"$dir/initdb.log" 2>&1 \
        || { cat "$dir/initdb.log" >&2; exit 1; }
    for _ in 1 2 3 4 5; do
        port=$(free_port)
        if as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t 60 \
            -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c max_connections=300" \
            start >/dev/null 2>&1; then
            {
                echo "export KEELSON_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:$port/postgres"
                echo "export KEELSON_PG_DIR=$dir"
            } >"$dir/env"
            cp "$dir/env" "$CURRENT"
            log "PostgreSQL on 127.0.0.1:$port, data in $dir"
            cat "$dir/env"
            return
        fi
        log "start on port $port failed, trying another"
    done
    cat "$dir/postgres.log" >&2
    exit 1
}

stop() {
    local dir="${KEELSON_PG_DIR:-}"
    if [[ -z "$dir" && -f "$CURRENT" ]]; then
        dir=$(sed -n 's/^export KEELSON_PG_DIR=//p' "$CURRENT")
    fi
    [[ -n "$dir" ]] || { log "nothing to stop (KEELSON_PG_DIR is not set)"; return; }
    if [[ -f "$dir/data/postmaster.pid" ]]; then
        as_pg "$(find_bin)/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true
    fi
    if [[ -f "$CURRENT" ]] && grep -qx "export KEELSON_PG_DIR=$dir" "$CURRENT"; then
        rm -f "$CURRENT"
    fi
    rm -rf "$dir"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
