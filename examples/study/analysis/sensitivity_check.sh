#!/bin/sh
# Deliberately fails, so the demo shows a failed job: its log and status message.
echo "sensitivity check: the demo data is too small to run this check" >&2
exit 3
