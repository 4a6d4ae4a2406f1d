"""Parse and validate a generated project.yaml of 2 000 actions (about 1 MB).

Target: well under 0.5 s. Floor: PyYAML's plain libyaml load (yaml.CSafeLoader) of the same text,
which checks nothing and records no lines.
"""

from __future__ import annotations

import yaml
from benchlib import report, timed

from jobrunner_lib.pipeline.project import load_pipeline


def generate(actions: int = 2000) -> str:
    """A v4 project: every 10th action extracts a dataset, the others model it."""
    lines = ["version: '4.0'", "", "actions:"]
    for i in range(actions):
        lines.append(f"  action_{i:05d}:")
        if i % 10 == 0:
            lines += [
                "    run: >",
                f"      ehrql:v1 generate-dataset analysis/dataset_definition_{i}.py",
                f"      --output output/dataset_{i}.arrow",
                "    outputs:",
                "      highly_sensitive:",
                f"        dataset: output/dataset_{i}.arrow",
            ]
            continue
        lines += [
            f"    run: r:v2 analysis/model_{i}.R --alpha 0.05 --label 'model {i}'",
            f"    needs: [action_{i - i % 10:05d}, action_{i - 1:05d}]",
            "    config:",
            "      alpha: 0.05",
            f'      label: "it\'s model {i}"',
            "      groups: [age, sex, region, imd, ethnicity]  # covariates",
            "    outputs:",
            "      moderately_sensitive:",
            f"        table: output/model_{i}/table_*.csv",
            f"        figure: output/model_{i}/figure.png",
            f"        log: logs/model_{i}.log",
            f"        summary: output/model_{i}/summary.json",
            "      highly_sensitive:",
            f"        data: output/model_{i}/data.rds",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    """Print the median of 5 loads, next to the floor."""
    text = generate()
    pipeline = load_pipeline(text)  # fail loudly before printing any figure
    if len(pipeline.actions) != 2000 or len(text) < 900_000:
        raise SystemExit(
            f"bench input is wrong: {len(pipeline.actions)} actions, {len(text)} bytes"
        )
    floor = timed(lambda: yaml.load(text, Loader=yaml.CSafeLoader))
    report("pipeline_load_2000_actions", timed(lambda: load_pipeline(text)), "s", floor)


if __name__ == "__main__":
    main()
