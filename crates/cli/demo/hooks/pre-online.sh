#!/bin/sh
# Runs once the checkurl passes, before the instance takes traffic.
echo "preOnline: warming up demo $(cat ../VERSION)"
echo "${KEELSON_HOST:-?},preOnline,$(cat ../VERSION)" >> "$DEMO_HOOK_LOG"
