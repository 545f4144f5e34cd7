"""The scenario loader and ``turnstorm render`` as a hostile user would feed them: the
shipped scenarios with a node of another type, and with one character edited. Every one
gets a one-line error naming the file and the field, or loads; nothing else escapes.

Counts are the CI's (deterministic: ``derandomize``), a few seconds each: 5,000 retyped
documents and 1,000 edited texts drawn by hypothesis, and every retyped document once
more without it."""

from __future__ import annotations

import copy
import datetime
import io
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from turnstorm.cli import main
from turnstorm.localmode.scenario import ScenarioError, parse_scenario, scenario_from_documents

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = {path.name: path.read_text() for path in sorted((ROOT / "scenarios").glob("*.yaml"))}
DOCUMENTS = {name: [d for d in yaml.safe_load_all(text) if d is not None]
             for name, text in SHIPPED.items()}
TYPE_MUTATIONS = 5000
CHARACTER_EDITS = 1000


def fuzz(examples: int) -> settings:
    return settings(max_examples=examples, derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


Path_ = tuple[Any, ...]


def node_paths(node: Any, prefix: Path_ = ()) -> list[Path_]:
    """Every node of a document, the document itself first."""
    found = [prefix]
    if isinstance(node, dict):
        for key, child in node.items():
            found += node_paths(child, (*prefix, key))
    elif isinstance(node, list):
        for index, child in enumerate(node):
            found += node_paths(child, (*prefix, index))
    return found


def node_at(document: Any, path: Path_) -> Any:
    for step in path:
        document = document[step]
    return document


def values_of_every_type() -> list[Any]:
    """What YAML can give a node: scalars of each type (edge cases included), and lists
    and mappings of them (keys of any type)."""
    scalars: list[Any] = [
        None, True, False, 0, 1, -1, 7, 65536, 2**63, -(2**64), 0.0, -0.5, 1.5, 1e300,
        float("nan"), float("inf"), float("-inf"), "", "x", "0", "10", "1.5", "true",
        "null", "storm-pool", " spaced ", "a\nb", "\t", "é", "x" * 300, "61000-61999",
        datetime.date(2026, 1, 2), datetime.datetime(2026, 1, 2, 3, 4, 5)]
    containers: list[Any] = [[], {}, [[]], [{}], [None], {"": None}, {"a\nb": 1},
                             {1: "a"}, {True: 1}, {None: 1}, {"name": {}}]
    for value in scalars:
        containers += [[value], [value, value], {"name": value}, {"min": value},
                       {"k": [value]}]
    return scalars + containers


VALUES = values_of_every_type()
KEYS = [v for v in VALUES if not isinstance(v, list | dict)]
LOCATIONS = [(name, index, path) for name in sorted(DOCUMENTS)
             for index, document in enumerate(DOCUMENTS[name])
             for path in node_paths(document)]
"""Every node of every shipped document: (file, document index, path)."""


def yaml_type(value: Any) -> type[Any]:
    return bool if isinstance(value, bool) else type(value)


def replaced(node: Any, path: Path_, new: Any) -> Any:
    """``node`` with the node at ``path`` replaced by ``new``; what the path goes
    through is copied, the rest shared (the loader copies what it changes)."""
    if not path:
        return new
    copied = copy.copy(node)
    copied[path[0]] = replaced(node[path[0]], path[1:], new)
    return copied


def mutations() -> list[tuple[int, int, bool]]:
    """Every mutation: (location, value, add). ``add``: the mapping at the location gets
    one more entry, ``VALUES[value]`` under a key of any type; else the node at the
    location becomes ``VALUES[value]``, of another type than the node's."""
    found = []
    for location, (name, index, path) in enumerate(LOCATIONS):
        old = node_at(DOCUMENTS[name][index], path)
        for value, new in enumerate(VALUES):
            if yaml_type(new) is not yaml_type(old):
                found.append((location, value, False))
            if isinstance(old, dict):
                found.append((location, value, True))
    return found


MUTATIONS = mutations()


def retype(case: int) -> list[Any]:
    """The documents of mutation number ``case`` (see :func:`mutations`)."""
    location, value, add = MUTATIONS[case]
    name, index, path = LOCATIONS[location]
    documents = list(DOCUMENTS[name])
    old = node_at(documents[index], path)
    new = {**old, KEYS[value % len(KEYS)]: VALUES[value]} if add else VALUES[value]
    documents[index] = replaced(documents[index], path, new)
    return documents


CHARACTERS = list(" \n\t\r:-?[]{},#&*!|>'\"%@`.0123456789aeEnx~\\/") + [
    "\x00", "\x7f", "\x85", "\u00e9", "\u2028", "\ufeff", "\U0001f600"]
EDITS = [(name, at, kind, char) for name in sorted(SHIPPED)
         for at, here in enumerate(SHIPPED[name])
         for kind, chars in (("delete", [""]), ("insert", CHARACTERS), ("replace", CHARACTERS))
         for char in chars if not (kind == "replace" and char == here)]
"""Every single-character edit of the shipped files: (file, position, kind, character)."""


def edit(case: int) -> str:
    """The text of edit number ``case``: one character inserted, deleted or replaced."""
    name, at, kind, char = EDITS[case]
    text = SHIPPED[name]
    return text[:at] + char + text[at + (kind != "insert"):]


# One draw per document: hypothesis spends more time on a draw than the loader on a
# document, so each document is the number of a mutation, drawn (and shrunk towards the
# first ones) by hypothesis.
retyped = st.integers(0, len(MUTATIONS) - 1)
edited = st.integers(0, len(EDITS) - 1)


def outcome(load: Any, *args: Any) -> str:
    """``ok`` or ``error`` (a one-line ScenarioError naming the file); any other exception
    fails the test."""
    try:
        load(*args, "fuzz.yaml")
    except ScenarioError as exc:
        message = str(exc)
        assert message.startswith("fuzz.yaml: "), message
        assert "\n" not in message, message
        return "error"
    return "ok"


def test_nodes_of_another_type_get_the_field_error() -> None:
    seen: Counter[str] = Counter()
    cases: set[int] = set()

    @fuzz(TYPE_MUTATIONS)
    @given(retyped)
    def check(case: int) -> None:
        cases.add(case)
        seen[outcome(scenario_from_documents, retype(case))] += 1

    check()
    assert len(cases) >= TYPE_MUTATIONS  # as many different documents
    assert seen["error"] > TYPE_MUTATIONS // 2, seen  # the mutations do reach the checks


def test_every_mutation_gets_the_field_error() -> None:
    """All of them, in order, without hypothesis (a second or two): the draws above are
    a fifth of them, and a message with a line break once hid in the rest."""
    seen = Counter(outcome(scenario_from_documents, retype(case))
                   for case in range(len(MUTATIONS)))
    assert seen["error"] > len(MUTATIONS) // 2, seen


def test_single_character_edits_get_the_field_error() -> None:
    seen: Counter[str] = Counter()
    texts: set[str] = set()

    @fuzz(CHARACTER_EDITS)
    @given(edited)
    def check(case: int) -> None:
        text = edit(case)
        texts.add(text)
        seen[outcome(parse_scenario, text)] += 1

    check()
    assert len(texts) >= CHARACTER_EDITS * 0.99  # a few edits give the same text
    assert seen["error"] > 0 and seen["ok"] > 0, seen


RENDER_MUTATIONS = 100


def test_render_answers_retyped_pools_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """``turnstorm render - --namespace`` on the TurnPool documents of the mutations."""
    seen: Counter[int] = Counter()

    @fuzz(RENDER_MUTATIONS)
    @given(retyped)
    def check(case: int) -> None:
        text = dump(retype(case))
        out, err = io.StringIO(), io.StringIO()
        with monkeypatch.context() as patch:
            patch.setattr("sys.stdin", io.StringIO(text))
            patch.setattr("sys.stdout", out)
            patch.setattr("sys.stderr", err)
            code = main(["render", "-", "--namespace", "fuzz"])
        seen[code] += 1
        if code:
            assert err.getvalue().startswith("turnstorm render: "), err.getvalue()
            assert err.getvalue().count("\n") == 1, err.getvalue()
        else:
            assert "namespace:" in out.getvalue() and err.getvalue() == ""

    check()
    assert seen[0] > 0 and seen[1] > 0, seen


def dump(documents: list[Any]) -> str:
    return yaml.safe_dump_all(documents, sort_keys=False)


def quick() -> list[Any]:
    return copy.deepcopy(DOCUMENTS["quick.yaml"])


def load_error(documents: list[Any]) -> str:
    with pytest.raises(ScenarioError) as caught:
        parse_scenario(dump(documents), "bad.yaml")
    return str(caught.value)


def test_metadata_of_another_type() -> None:
    documents = quick()
    documents[0]["metadata"] = ["storm-pool"]
    assert load_error(documents) == (
        "bad.yaml: TurnPool ?: metadata: must be an object, got list ['storm-pool']")
    documents = quick()
    documents[1]["metadata"]["annotations"] = "uniform:3-6"
    assert load_error(documents) == ("bad.yaml: LoadRun storm-quick: metadata.annotations: "
                                     "must be an object, got str 'uniform:3-6'")
    documents = quick()
    documents[0]["metadata"]["annotations"]["turnstorm.io/time-scale"] = 10
    assert load_error(documents) == (
        "bad.yaml: TurnPool storm-pool: metadata.annotations.turnstorm.io/time-scale: must "
        "be a string, got int 10")
    documents = quick()
    documents[0]["metadata"]["name"] = 7
    assert load_error(documents) == (
        "bad.yaml: TurnPool ?: metadata.name: must be a string, got int 7")


def test_spec_nodes_of_another_type() -> None:
    documents = quick()
    documents[0]["spec"]["replicas"] = 3
    assert load_error(documents) == ("bad.yaml: TurnPool storm-pool: spec.replicas: must be "
                                     "an object, got int 3")
    documents = quick()
    documents[1]["spec"]["shape"]["params"] = {1: 2}
    assert load_error(documents) == ("bad.yaml: LoadRun storm-quick: spec.shape.params: "
                                     "field names must be strings, got int 1")
    documents = quick()
    documents[1]["spec"]["shape"]["params"]["a\nb"] = "a\nb"
    assert load_error(documents) == ("bad.yaml: LoadRun storm-quick: "
                                     "spec.shape.params['a\\nb']: 'a\\nb' is not a number")
    documents = quick()
    documents[0]["spec"]["scaling"]["tolerance"] = float("nan")
    assert load_error(documents) == ("bad.yaml: TurnPool storm-pool: spec.scaling.tolerance: "
                                     "must be a finite number, got nan")
    documents = quick()
    documents[1]["spec"]["limits"] = {"maxPps": 10**30}
    assert load_error(documents) == ("bad.yaml: LoadRun storm-quick: spec.limits.maxPps: "
                                     "must be a 64-bit integer, got "
                                     "1000000000000000000000000000000")
    documents = quick()
    documents[0]["spec"]["scaling"]["targets"]["probeRttMs"] = 10**400
    assert load_error(documents) == ("bad.yaml: TurnPool storm-pool: "
                                     "spec.scaling.targets.probeRttMs: must be a finite "
                                     "number, got " + "1" + "0" * 56 + "...")
    documents = quick()
    documents[0]["spec"]["realm"] = {"name": "x" * 80}
    assert load_error(documents) == (
        "bad.yaml: TurnPool storm-pool: spec.realm: must be a string, got dict "
        "{'name': '" + "x" * 47 + "...")


def test_nulls_in_metadata_read_as_unset() -> None:
    documents = quick()
    documents[0]["metadata"]["labels"] = None
    documents[0]["metadata"]["namespace"] = None
    scenario = parse_scenario(dump(documents), "ok.yaml")
    assert scenario.pool.namespace == "default" and scenario.pool.labels == {}
    documents[1]["metadata"]["name"] = None
    assert load_error(documents) == "bad.yaml: LoadRun ?: metadata.name: Required value"


def test_a_date_of_no_calendar_is_invalid_yaml() -> None:
    text = SHIPPED["quick.yaml"].replace("name: storm-quick", "name: 2026-02-30")
    with pytest.raises(ScenarioError) as caught:
        parse_scenario(text, "bad.yaml")
    assert str(caught.value) == "bad.yaml: not valid YAML: day is out of range for month"


def test_render_names_the_metadata_field(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    pool = copy.deepcopy(DOCUMENTS["quick.yaml"][0])
    pool["metadata"] = ["storm-pool"]
    bad = tmp_path / "pool.yaml"
    bad.write_text(dump([pool]))
    assert main(["render", str(bad), "--namespace", "ns"]) == 1
    assert capsys.readouterr().err == ("turnstorm render: metadata: must be an object, got "
                                       "list ['storm-pool']\n")
    pool["metadata"] = None
    bad.write_text(dump([pool]))
    assert main(["render", str(bad), "--namespace", "ns"]) == 1
    assert capsys.readouterr().err == "turnstorm render: metadata.name: Required value\n"
    pool["metadata"] = {"name": "p", "namespace": None}
    bad.write_text(dump([pool]))
    assert main(["render", str(bad), "--namespace", "ns"]) == 0
    assert "  namespace: ns\n" in capsys.readouterr().out


def test_yaml_date_values_are_not_strings() -> None:
    documents = quick()
    documents[0]["spec"]["realm"] = datetime.date(2026, 1, 2)
    assert load_error(documents) == ("bad.yaml: TurnPool storm-pool: spec.realm: must be a "
                                     "string, got date datetime.date(2026, 1, 2)")
