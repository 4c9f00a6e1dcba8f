"""``recdsl explain --format json`` (a stable schema for tools) and ``--format dot`` (a Graphviz diagram).

The JSON is checked against the analysis of every example cell; the dot text is checked
as text (clusters, read-out edges, every edge between declared nodes).  Rendering is
tested only where Graphviz's ``dot`` is installed; without it, asking for a PNG is a
clean error.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest

from recdsl.analysis import analyze
from recdsl.cli import main
from recdsl.errors import MissingDependencyError
from recdsl.explain_formats import SCHEMA, explanation_dot, render_dot
from recdsl.frontend import load

from example_dims import DIMS, EXAMPLES

TOP_LEVEL_KEYS = {
    "schema", "cell", "dims", "inputs", "params", "time_parallel", "stepwise_bindings", "hoisted",
    "states", "scans", "schedule", "coupled_groups", "outputs", "backend",
}
STATE_KEYS = {
    "name", "shape", "kind", "class", "class_text", "structure", "update", "expanded_update",
    "decay", "input", "transition", "low_rank", "semiring", "reason", "reads", "direction",
}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _json(example: str, capsys) -> dict:
    assert main(["explain", str(EXAMPLES / f"{example}.rec"), *_dim_args(example), "--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)


def _dim_args(example: str) -> list[str]:
    return [arg for name, value in DIMS[example].items() for arg in ("--dim", f"{name}={value}")]


@pytest.mark.parametrize("example", sorted(DIMS))
def test_json_has_the_documented_schema_for_every_example(example, capsys):
    document = _json(example, capsys)
    assert set(document) == TOP_LEVEL_KEYS, f"{example}: keys {sorted(set(document) ^ TOP_LEVEL_KEYS)} differ from the schema"
    assert document["schema"] == SCHEMA
    analysis = analyze(load(EXAMPLES / f"{example}.rec", dims=DIMS[example]))
    assert document["cell"] == analysis.cell.name
    assert document["dims"] == dict(analysis.cell.dims)
    assert [s["name"] for s in document["states"]] == [s.state for s in analysis.states]
    for state in document["states"]:
        assert set(state) == STATE_KEYS, f"{example}: state {state['name']} keys differ from the schema"
    assert document["schedule"] == [list(g) for g in analysis.schedule]
    assert [o["index"] for o in document["outputs"]] == [e.index for e in analysis.cell.outputs]
    assert document["backend"]["requested"] == "auto" and document["backend"]["name"] in ("sequential", "scan", "chunked", "fused", "newton")


@pytest.mark.parametrize(
    "example, state, cls, structure",
    [
        ("mingru", "h", "diagonal_affine", "elementwise"),
        ("gla", "S", "matrix_affine", "diagonal over rows"),
        ("retnet", "S", "matrix_affine", "scalar"),
        ("deltanet", "S", "matrix_affine", "identity plus low rank"),
        ("crf", "prior", "semiring_affine", "matrix"),
        ("gru", "h", "nonlinear", None),
    ],
)
def test_json_states_carry_class_and_structure(example, state, cls, structure, capsys):
    states = {s["name"]: s for s in _json(example, capsys)["states"]}
    assert states[state]["class"] == cls
    assert states[state]["structure"] == structure


def test_json_details_of_deltanet_lstm_mlstm_and_aaren(capsys):
    delta = _json("deltanet", capsys)
    (state,) = delta["states"]
    assert state["low_rank"] == [{"coefficient": "-beta", "left": "k", "right": "k"}]
    assert state["input"] == "beta * outer(k, v)"
    assert delta["outputs"][0]["readouts"] == [{"state": "S", "expr": "q @ S", "reduces": True}]
    assert delta["backend"]["name"] == "chunked"

    lstm = _json("lstm", capsys)
    assert lstm["coupled_groups"] == [["c", "h"]]
    from recdsl.backends.fused_sequential import compiler

    assert lstm["backend"]["name"] == ("fused" if compiler() else "sequential")  # no scan form: the loop, compiled when it can be
    assert {s["name"]: s["reads"] for s in lstm["states"]} == {"c": ["h"], "h": ["c"]}

    mlstm = {s["name"]: s for s in _json("mlstm", capsys)["states"]}
    assert mlstm["m"]["semiring"] == "max-plus"

    aaren = _json("aaren", capsys)
    assert aaren["states"] == []
    (scan,) = aaren["scans"]
    assert scan["monoid"] == "SoftmaxSum"
    assert [c["name"] for c in scan["carries"]] == ["m", "s", "n"]


def test_json_goes_to_stdout_and_the_dims_note_to_stderr(capsys):
    assert main(["explain", str(EXAMPLES / "mingru.rec"), "--format", "json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["dims"] == {"d_in": 8, "d": 12}
    assert "dims not given" in captured.err


def _dot(example: str) -> str:
    analysis = analyze(load(EXAMPLES / f"{example}.rec", dims=DIMS[example]))
    return explanation_dot(analysis, ("auto", "sequential", "test"))


def _check_dot_is_well_formed(text: str) -> None:
    assert text.startswith("digraph ") and text.rstrip().endswith("}")
    assert text.count("{") == text.count("}")
    declared = set(re.findall(r'^\s*("[^"]+") \[label=', text, re.M))
    for source, target in re.findall(r'^\s*("[^"]+") -> ("[^"]+")', text, re.M):
        assert source in declared and target in declared, f"edge {source} -> {target} between undeclared nodes"


@pytest.mark.parametrize("example", sorted(DIMS))
def test_dot_is_well_formed_for_every_example(example):
    _check_dot_is_well_formed(_dot(example))


def test_dot_shows_coupled_groups_time_parallel_part_and_readouts():
    lstm = _dot("lstm")
    assert 'subgraph "cluster_coupled_0"' in lstm and "coupled: c, h" in lstm
    mlstm = _dot("mlstm")
    assert 'subgraph "cluster_time_parallel"' in mlstm
    time_parallel = mlstm.split('subgraph "cluster_time_parallel"')[1].split("}")[0]
    assert '"binding:logf"' in time_parallel and '"state:' not in time_parallel
    assert '"state:C" -> "out:0" [label="linear read-out: q @ C"' in mlstm
    gla = _dot("gla")
    assert '"state:S" -> "state:S" [label="matrix affine"' in gla
    assert '"input:q" -> "out:0";' in gla


def test_dot_text_from_the_command_line(capsys):
    assert main(["explain", str(EXAMPLES / "gla.rec"), *_dim_args("gla"), "--format", "dot"]) == 0
    text = capsys.readouterr().out
    _check_dot_is_well_formed(text)
    assert "backend scan (requested auto)" in text  # at these small dims the cost model prefers the scan


def test_dot_written_to_a_dot_file(tmp_path, capsys):
    target = tmp_path / "gla.dot"
    assert main(["explain", str(EXAMPLES / "gla.rec"), *_dim_args("gla"), "--format", "dot", "--output", str(target)]) == 0
    _check_dot_is_well_formed(target.read_text())


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot program is not installed")
def test_dot_rendered_to_png(tmp_path, capsys):
    target = tmp_path / "lstm.png"
    assert main(["explain", str(EXAMPLES / "lstm.rec"), "--format", "dot", "--output", str(target)]) == 0
    assert target.read_bytes().startswith(PNG_SIGNATURE)


def test_png_without_graphviz_is_a_clean_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(MissingDependencyError, match="Graphviz"):
        render_dot("digraph G {}\n", tmp_path / "g.png")
    assert main(["explain", str(EXAMPLES / "gla.rec"), *_dim_args("gla"), "--format", "dot", "--output", str(tmp_path / "g.png")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("missing dependency: rendering g.png needs Graphviz's `dot` program")
    assert "apt-get install graphviz" in err
    assert not (tmp_path / "g.png").exists()


def test_json_and_text_written_to_files(tmp_path, capsys):
    target = tmp_path / "gla.json"
    assert main(["explain", str(EXAMPLES / "gla.rec"), *_dim_args("gla"), "--format", "json", "--output", str(target)]) == 0
    assert json.loads(target.read_text())["cell"] == "GLA"
    assert capsys.readouterr().out == f"wrote {target}\n"
    text = tmp_path / "gla.txt"
    assert main(["explain", str(EXAMPLES / "gla.rec"), *_dim_args("gla"), "--output", str(text)]) == 0
    assert "S [4, 3]: state, matrix affine" in text.read_text()


def test_dot_draws_a_readout_reached_through_a_binding():
    source = """
cell Through(dk, dv) {
    input q: [dk]
    input k: [dk]
    input v: [dv]
    state S: [dk, dv] = 0
    S = 0.5 * S + outer(k, v)
    o = q @ S
    out o
}
"""
    text = explanation_dot(analyze(load(source, dims={"dk": 3, "dv": 2})), ("auto", "chunked", "test"))
    _check_dot_is_well_formed(text)
    assert '"state:S" -> "out:0" [label="linear read-out: q @ S"' in text
    assert '"binding:o" -> "out:0";' in text
