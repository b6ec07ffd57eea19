#!/usr/bin/env bash
# The browser tests of /desk and /wall drive the Debian Chromium (packages chromium and
# chromium-driver) through Playwright; never a browser download of Playwright's own. Install
# them when missing and we are root; otherwise say so (those tests then skip, saying why).
set -euo pipefail

if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver
  echo "browser: installed $(/usr/bin/chromium --version 2>/dev/null || echo chromium)"
else
  echo "browser: /usr/bin/chromium is missing; install chromium and chromium-driver" \
    "(e.g. sudo apt-get install chromium chromium-driver) or the browser tests skip" >&2
fi
