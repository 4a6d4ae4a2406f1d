#!/bin/sh
# Aggregates the dataset into counts per region (moderately sensitive: reviewable, releasable).
set -eu
awk -F, 'NR > 1 { n[$4]++; age[$4] += $2 } END { print "region,patients,mean_age";
  for (r in n) printf "%s,%d,%.1f\n", r, n[r], age[r] / n[r] }' output/dataset.csv \
  | (read -r header; echo "$header"; sort) > output/summary.csv
echo "summarised $(($(wc -l < output/dataset.csv) - 1)) rows" | tee output/summarise.log
