#!/bin/sh
# Runs before the app starts, with its output shown live.
# Hooks run in the hooks directory, inside the app's working directory.
echo "preStart: preparing demo $(cat ../VERSION) for ${KEELSON_HOST:-this host}"
echo "${KEELSON_HOST:-?},preStart,$(cat ../VERSION)" >> "$DEMO_HOOK_LOG"
