#!/bin/sh
# Writes a fake patient-level dataset of N rows (highly sensitive in a real study).
set -eu
n=${1:-100}
mkdir -p output
echo "patient_id,age,sex,region" > output/dataset.csv
i=1
while [ "$i" -le "$n" ]; do
  echo "$i,$(( (i * 37) % 90 + 10 )),$(( i % 2 )),$(( i % 7 ))" >> output/dataset.csv
  i=$((i + 1))
done
echo "wrote $n rows to output/dataset.csv"
