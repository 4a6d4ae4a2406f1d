#!/bin/sh
# Draws a bar chart of patients per region as SVG.
set -eu
{
  echo '<svg xmlns="http://www.w3.org/2000/svg" width="400" height="220">'
  awk -F, 'NR > 1 { printf "<rect x=\"%d\" y=\"%d\" width=\"40\" height=\"%d\" fill=\"steelblue\"/>\n", 20 + (NR - 2) * 50, 200 - $2 * 4, $2 * 4 }' output/summary.csv
  echo '</svg>'
} > output/plot.svg
echo "plotted output/plot.svg"
