"""SARIF 2.1.0 for code-scanning uploads (`--format sarif`): one run, one result per finding.

Checkpoints are binary, so a result points at the file (artifactLocation) and names the module,
layer and direction as a logical location; spans go into the message and `properties`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

from rnndiag._version import __version__
from rnndiag.findings import RULES, Finding, Level, findings
from rnndiag.records import FileDiagnosis

SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"


def document(files: Sequence[FileDiagnosis], errors: Sequence[str] = ()) -> dict[str, Any]:
    """Build one SARIF run: the rule table as the driver's rules, a result per finding; a run
    that failed as a whole (`errors`: bad options) says so in its invocation."""
    rules = list(RULES)
    run: dict[str, Any] = {
        "$schema": SARIF_SCHEMA,
        "version": "2.1.0",
        "runs": [{
            "tool": {"driver": {
                "name": "rnndiag", "version": __version__,
                "informationUri": "https://github.com/rnndiag/rnndiag",
                "rules": [{"id": i.id, "name": i.name, "shortDescription": {"text": i.help}}
                          for i in RULES.values()],
            }},
            "results": [_result(x, rules.index(x.rule)) for f in files for x in findings(f)]
            + [_error(f) for f in files if f.error],
        }],
    }
    if errors:
        run["runs"][0]["invocations"] = [{
            "executionSuccessful": False,
            "toolExecutionNotifications": [{"level": "error", "message": {"text": e}}
                                           for e in errors]}]
    return run


def _result(x: Finding, rule_index: int) -> dict[str, Any]:
    where = x.module or "<root>"
    if x.layer is not None:
        where += f" layer {x.layer} {x.direction}"
    props: dict[str, Any] = {"value": _value(x.value)}
    if x.span is not None:
        props["span"] = {"start": x.span.start, "end": x.span.end}
    result = {
        "ruleId": x.rule.value,
        "ruleIndex": rule_index,
        "level": {Level.ERROR: "error", Level.WARNING: "warning", Level.NOTE: "note"}[x.level],
        "message": {"text": f"{where}: {x.message}"},
        "locations": [{
            "physicalLocation": {"artifactLocation": {"uri": uri(x.path)}},
            "logicalLocations": [{"name": where, "kind": "module"}],
        }],
        "properties": props,
    }
    if x.ignored:  # accepted in the project's configuration
        result["suppressions"] = [{"kind": "external", "justification": "rnndiag config ignore"}]
    return result


def _error(f: FileDiagnosis) -> dict[str, Any]:
    return {"ruleId": "RD000", "level": "error",
            "message": {"text": f"unusable input: {f.error}"},
            "locations": [{"physicalLocation": {"artifactLocation": {"uri": uri(f.path)}}}]}


def _value(x: float | None) -> float | str | None:
    """A finding's number; SARIF is JSON, which has no Infinity or NaN: those as text."""
    return x if x is None or math.isfinite(x) else str(x)


def uri(path: str) -> str:
    """The path as SARIF's artifact uri: as given, but bytes that are not UTF-8 in the file
    name (read by Python as lone surrogates) percent-encoded, so the document is valid."""
    if not any("\ud800" <= c <= "\udfff" for c in path):
        return path
    return quote(path.encode("utf-8", "surrogateescape" if _escaped(path) else "surrogatepass"),
                 safe="/:")


def _escaped(path: str) -> bool:
    return all(not "\ud800" <= c <= "\udfff" or "\udc80" <= c <= "\udcff" for c in path)
