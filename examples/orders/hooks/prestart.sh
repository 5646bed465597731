#!/bin/sh
# Prepares the working directory before the JVM starts.
set -eu
mkdir -p /tmp/orders/cache
echo "prepared cache directory"
