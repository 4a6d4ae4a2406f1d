#!/bin/sh
# A single total (minimally sensitive).
set -eu
echo "total patients: $(($(wc -l < output/dataset.csv) - 1))" > output/counts.txt
cat output/counts.txt
