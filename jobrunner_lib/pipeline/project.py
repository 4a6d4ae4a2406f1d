"""project.yaml: load it, validate it as the official parser does, and resolve `needs`.

jr accepts exactly what the official parser (opensafely 2.0.4; docs/pipeline.md)
accepts and rejects the rest with the same words, but reports every problem at once with its
action and line, rejects `needs` cycles and names unsafe in log lines, file names or URLs
(pipeline_names), and turns the inputs that crash the official parser into ordinary validation
errors. Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

from jobrunner_lib.pipeline.commands import config_json, is_database_action
from jobrunner_lib.pipeline.document import YamlDocument, YamlProblem, load_yaml
from jobrunner_lib.pipeline.graph import cycles, find_cycle, topological_order
from jobrunner_lib.pipeline.names import action_name_problem, image_name_problem
from jobrunner_lib.pipeline.rules import (
    LATEST_VERSION,
    PRIVACY_LEVELS,
    RUN_ALL,
    TOP_LEVEL_KEYS,
    ActionSpec,
    Features,
    Problem,
    ProjectCheck,
    check_action,
    close_match_hint,
    features_for,
    one_line,
    unexpected_parameters,
    validate_output_path,
)

__all__ = [
    "Action",
    "Pipeline",
    "ProjectValidationError",
    "RUN_ALL",
    "find_cycle",
    "load_pipeline",
    "topological_order",
    "validate_output_path",
]


class ProjectValidationError(Exception):
    """project.yaml is invalid; `errors` holds every problem, one line each."""

    def __init__(self, errors: list[str], filename: str = "project.yaml") -> None:
        self.errors = list(errors)
        self.filename = filename
        super().__init__(f"Invalid project: {filename}\n" + "\n".join(self.errors))


@dataclass(frozen=True)
class Action:
    """One validated action of project.yaml."""

    name: str
    run: str
    image: str
    tag: str
    args: tuple[str, ...]
    needs: tuple[str, ...]
    outputs: dict
    config: dict | None
    dummy_data_file: str | None
    is_database_action: bool
    line: int | None

    def command_args(self) -> list[str]:
        """Arguments for the container: `run` after the image, plus `--config <json>` if set."""
        if self.config is None:
            return list(self.args)
        return [*self.args, "--config", config_json(self.config)]


@dataclass(frozen=True)
class Pipeline:
    """A validated project.yaml."""

    version: float
    actions: dict[str, Action]
    population_size: int | None
    warnings: tuple[str, ...]

    def all_actions(self) -> list[str]:
        """Every action in file order, without a user-defined `run_all`."""
        return [name for name in self.actions if name != RUN_ALL]

    def dependencies(self, action: str) -> list[str]:
        """Everything `action` needs, directly or not, each before the actions needing it."""
        if action not in self.actions:
            raise KeyError(f"Action '{action}' not found in project.yaml")
        return topological_order(self._graph, [action])[:-1]

    @cached_property
    def _graph(self) -> dict[str, tuple[str, ...]]:
        return {name: action.needs for name, action in self.actions.items()}


def load_pipeline(text: str | bytes, filename: str = "project.yaml") -> Pipeline:
    """Parse and validate project.yaml text; raises ProjectValidationError listing every problem."""
    try:
        doc = load_yaml(text)
    except YamlProblem as exc:
        error = Problem(exc.message, exc.line).format(filename)
        raise ProjectValidationError([error], filename) from None
    result = check_project(doc)
    if result.problems or result.version is None:
        errors = [problem.format(filename) for problem in result.problems]
        raise ProjectValidationError(errors, filename)
    actions = {spec.name: _make_action(spec) for spec in result.actions}
    return Pipeline(result.version, actions, result.population_size, tuple(result.warnings))


def _make_action(spec: ActionSpec) -> Action:
    assert spec.run is not None and spec.parts, "only called for valid actions"
    image, _, tag = spec.parts[0].partition(":")
    return Action(
        name=spec.name,
        run=spec.run,
        image=image,
        tag=tag,
        args=tuple(spec.parts[1:]),
        needs=tuple(spec.needs),
        outputs=spec.outputs,
        config=spec.config,
        dummy_data_file=spec.dummy_data_file,
        is_database_action=is_database_action(spec.parts),
        line=spec.line,
    )


def check_project(doc: YamlDocument) -> ProjectCheck:
    """Every rule of docs/pipeline.md over parsed YAML, in §9 order, collecting all problems."""
    result = ProjectCheck()
    result.problems.extend(_yaml_problems(doc))
    data = doc.data
    if not isinstance(data, dict):  # the official parser crashes with a TypeError here
        shape = "empty" if data is None else f"a {type(data).__name__}"
        message = f"the file is {shape}; it must be a mapping with `version` and `actions` keys"
        result.problems.append(Problem(message, 1 if data is not None else None))
        return result
    unknown = [key for key in data if key not in TOP_LEVEL_KEYS]
    if unknown:
        message = unexpected_parameters(unknown, "project", TOP_LEVEL_KEYS)
        result.problems.append(Problem(message, doc.line_of(data, unknown[0])))
    feat = _check_version(doc, data, result)
    actions = data.get("actions")
    if not isinstance(actions, dict):
        message = "Project `actions` section must be a dictionary of key/value pairs"
        result.problems.append(Problem(message, doc.line_of(data, "actions")))
        actions = {}
    _check_actions(doc, actions, feat, result)
    _check_across_actions(actions, feat, result)
    _check_expectations(doc, data, feat, result)
    _check_names(doc, actions, result)
    _check_cycles(result)
    return result


def _yaml_problems(doc: YamlDocument) -> list[Problem]:
    problems = []
    for found in doc.problems:
        path = found.path
        action = str(path[1]) if len(path) > 1 and path[0] == "actions" else None
        inside = path[2:] if action is not None else path
        where = f" in `{'.'.join(map(str, inside))}`" if inside else ""
        problems.append(Problem(f"{found.message}{where}", found.line, action))
    return problems


def _check_version(doc: YamlDocument, data: dict, result: ProjectCheck) -> Features | None:
    """§9 step 3; the feature flags, or None when the version is unusable."""
    value, at = data.get("version"), doc.line_of(data, "version")
    if value is None:
        message = (
            "Project file must have a `version` attribute specifying which version of the project"
            f" configuration format it uses (current latest version is {LATEST_VERSION})"
        )
        result.problems.append(Problem(message, at))
        return None
    bad_number = f"`version` must be a number between 1 and {LATEST_VERSION}"
    try:
        version = float(value)  # as upstream, so "3", 3 and 3.0 (and even `true`) are accepted
    except (TypeError, ValueError):
        result.problems.append(Problem(bad_number, at))
        return None
    if version > LATEST_VERSION:  # the official parser crashes with this ValueError text
        message = f"{bad_number}: The latest version is v{LATEST_VERSION}, but got v{version}"
        result.problems.append(Problem(message, at))
        return None
    result.version = version
    if version != LATEST_VERSION:
        result.warnings.append(
            f"ProjectWarning: Your project file is using an old version ({version}); consider"
            f" updating to version {LATEST_VERSION}"
        )
    return features_for(version)


def _check_actions(doc: YamlDocument, actions: dict, feat: Features | None, result: ProjectCheck):
    """§9 step 5: each action in file order."""
    keys_by_name: dict[str, Any] = {}
    for key, body in actions.items():
        name, line = str(key), doc.line_of(actions, key)
        if name in keys_by_name:  # `2017:` and `"2017":` differ in YAML, but jr names by text
            message = f"action name {name} is used twice ({keys_by_name[name]!r} and {key!r})"
            result.problems.append(Problem(message, line, name))
        keys_by_name[name] = key
        if key == RUN_ALL and feat is not None and feat.no_run_all:
            message = (
                "`run_all` is a reserved action name and is not allowed for user-defined actions."
            )
            result.problems.append(Problem(message, line, name))
        elif key == RUN_ALL and feat is not None:
            result.warnings.append(
                "ProjectWarning: `run_all` is a reserved action name; user-defined actions with"
                " this name are ignored and will raise an error in later versions."
            )
        spec = check_action(doc, name, body, line, result.problems)
        if spec is not None:
            result.actions.append(spec)


def _check_across_actions(actions: dict, feat: Features | None, result: ProjectCheck) -> None:
    """§9 steps 6-10: the rules that look at several actions at once."""
    out, specs = result.problems, result.actions
    if feat is not None and feat.no_cohortextractor:
        for spec in specs:
            if spec.parts and spec.parts[0].startswith("cohortextractor"):
                message = f"Action {spec.name} uses cohortextractor actions, which are not supported in this version."
                out.append(Problem(message, spec.run_line, spec.name))
    if feat is not None and feat.no_latest_tag:
        for spec in specs:
            if spec.parts and spec.parts[0].endswith(":latest"):
                message = (
                    f"Action {spec.name} uses `{spec.parts[0]}`, which is not supported."
                    " Provide a version e.g. `:v2` instead"
                )
                out.append(Problem(message, spec.run_line, spec.name))
    runs: dict[str, list[str]] = {}
    for spec in specs:
        if spec.run:
            if spec.run in runs:
                others = ", ".join(runs[spec.run])
                message = (
                    f"Action {spec.name} has the same 'run' command as other actions: {others}"
                )
                out.append(Problem(message, spec.run_line, spec.name))
            runs.setdefault(spec.run, []).append(spec.name)
    if feat is not None and feat.unique_output_path:
        owners: dict[str, str] = {}
        for spec in specs:
            for level in PRIVACY_LEVELS:
                for path in spec.outputs.get(level, {}).values():
                    if path in owners:
                        message = f"Output path {path} is not unique (also an output of action '{owners[path]}')"
                        out.append(Problem(message, spec.line, spec.name))
                    owners.setdefault(path, spec.name)
    as_text = {str(key) for key in actions}
    for spec in specs:
        for need, line in zip(spec.needs, spec.needs_lines, strict=True):
            if need in actions:  # the original keys, as upstream: "2017" does not match `2017:`
                continue
            if need in as_text:
                hint = f" (YAML reads the action name {need} as a number; quote it where it is defined)"
            else:
                hint = close_match_hint(need, [key for key in actions if isinstance(key, str)])
            message = f"Action `{spec.name}` references an unknown action in its `needs` list: {need}{hint}"
            out.append(Problem(message, line, spec.name))


def _check_expectations(doc: YamlDocument, data: dict, feat: Features | None, result) -> None:
    """§9 step 11; also sets the population size (1000 below v3, none from v4)."""
    if feat is None:
        return
    value, at = data.get("expectations"), doc.line_of(data, "expectations")
    problems = result.problems
    if feat.no_cohortextractor:
        if value is not None:
            message = (
                "Project includes `expectations` section, which is not supported in this version."
                " This section is only applicable to deprecated cohortextractor actions; you can"
                " safely remove it."
            )
            problems.append(Problem(message, at))
        return
    if not feat.expectations_population:
        result.population_size = 1000  # whatever the section holds, as upstream
        return
    if value is None:
        problems.append(Problem("Project must include `expectations` section", at))
    elif not isinstance(value, dict):
        message = "Project `expectations` section must be a dictionary of key/value pairs"
        problems.append(Problem(message, at))
    else:
        if "population_size" not in value:
            message = "Project `expectations` section must include `population_size` section"
            problems.append(Problem(message, at))
        unknown = [key for key in value if key != "population_size"]
        if unknown:
            where = "project `expectations` section"
            message = unexpected_parameters(unknown, where, ("population_size",))
            problems.append(Problem(message, doc.line_of(value, unknown[0]) or at))
        if "population_size" in value:
            try:
                result.population_size = int(value["population_size"])
            except (TypeError, ValueError, OverflowError):
                message = "Project expectations population size must be a number"
                problems.append(Problem(message, doc.line_of(value, "population_size") or at))


def _check_names(doc: YamlDocument, actions: dict, result: ProjectCheck) -> None:
    """jr's own rule (pipeline_names): names that are safe in log lines, file names and URLs."""
    for key in actions:
        reason = action_name_problem(str(key))
        if reason:
            result.problems.append(Problem(reason, doc.line_of(actions, key), str(key)))
    for spec in result.actions:
        if not spec.parts:
            continue
        image = spec.parts[0].partition(":")[0]
        reason = image_name_problem(image)
        if reason:
            shown = one_line(image, 60)
            message = f"`run` uses image `{shown}`, which is not a valid name: {reason}"
            result.problems.append(Problem(message, spec.run_line, spec.name))


def _check_cycles(result: ProjectCheck) -> None:
    """jr's own rule: the official parser accepts cycles and the runner then recurses forever."""
    lines = {spec.name: spec.line for spec in result.actions}
    graph = {spec.name: spec.needs for spec in result.actions}
    for cycle in cycles(graph, first_only=False):
        if len(cycle) == 2:
            message = f"`needs` of action {cycle[0]} includes itself (needs form a cycle: {cycle[0]} -> {cycle[0]})"
        else:
            message = f"needs form a cycle: {' -> '.join(cycle)}"
        result.problems.append(Problem(message, lines.get(cycle[0]), cycle[0]))
