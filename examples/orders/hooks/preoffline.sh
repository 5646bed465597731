#!/bin/sh
# Asks the app to finish in-flight reservations before it is stopped.
set -eu
curl -fsS -X POST http://127.0.0.1:8081/drain || echo "drain endpoint not reachable; continuing"
