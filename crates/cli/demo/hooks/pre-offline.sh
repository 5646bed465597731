#!/bin/sh
# Runs after the instance left traffic and drained, before the app stops.
echo "preOffline: demo $(cat ../VERSION) leaves"
echo "${KEELSON_HOST:-?},preOffline,$(cat ../VERSION)" >> "$DEMO_HOOK_LOG"
