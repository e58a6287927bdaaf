"""The JSON document of `rnndiag check --format json` (schema_version below; see README).

Every float that is not finite (a gradient that overflowed, a NaN from NaN weights) is written
as `null`, and the steps where it happened are listed in `nonfinite_steps`, so the document is
always strict JSON (`allow_nan=False`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Any

from rnndiag._version import __version__
from rnndiag.findings import Advice, Finding, advice, findings
from rnndiag.outcome import FailOn, exit_code, inspect_exit_code
from rnndiag.records import (
    CheckOptions,
    ClipSuggestion,
    FileDiagnosis,
    ForgetBias,
    InspectDiagnosis,
    LayerDiagnosis,
    ModuleDiagnosis,
    ModuleSpec,
    NonFiniteTensor,
    Span,
    StaticLayer,
    Verdict,
)

SCHEMA_VERSION = "0.5.0"
OBJECTIVE = "final_state_energy"  # L = 1/(2B) sum_b sum_d ||h_final^{top,d}_b||^2


def document(files: Sequence[FileDiagnosis], options: CheckOptions | None,
             errors: Sequence[str] = (), fail_on: FailOn = FailOn.ANY) -> dict[str, Any]:
    verdicts = [f.verdict for f in files if f.verdict is not None]
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "rnndiag", "version": __version__},
        "options": _options(options, fail_on) if options else None,
        "verdict": Verdict.worst(verdicts).value if verdicts else None,
        "exit_code": 2 if errors else int(exit_code(files, fail_on)),
        "errors": [{"path": None, "message": e} for e in errors]
        + [{"path": f.path, "message": f.error} for f in files if f.error],
        "findings": [_finding(x) for f in files for x in findings(f)],
        "advice": [_advice(a) for a in advice(files)],
        "files": [_file(f) for f in files],
    }


def dumps(doc: dict[str, Any]) -> str:
    """Strict JSON (no NaN or Infinity), valid Unicode: a file name that is not UTF-8 (its
    bytes read as lone surrogates) is written with those bytes as `\\xff` escapes."""
    text = json.dumps(doc, indent=2, allow_nan=False)
    if "\\ud" in text:  # a surrogate escape, perhaps lone (rare: only then walk the document)
        text = json.dumps(_valid_text(doc), indent=2, allow_nan=False)
    return text + "\n"


_SURROGATE = re.compile("[\ud800-\udfff]")


def _valid_text(x: Any) -> Any:
    """`x` with every lone surrogate in its strings (keys too) written out as an escape."""
    if isinstance(x, str):
        return _SURROGATE.sub(_escape, x)
    if isinstance(x, dict):
        return {_valid_text(k): _valid_text(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_valid_text(v) for v in x]
    return x


def _escape(m: re.Match[str]) -> str:
    code = ord(m[0])
    # U+DC80..U+DCFF: a byte 0x80..0xFF that was not UTF-8 (surrogateescape); else a lone
    # surrogate that came in as text (a \\ud800 escape in a header)
    return f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"\\u{code:04x}"


def _options(o: CheckOptions, fail_on: FailOn) -> dict[str, Any]:
    return {
        "fail_on": fail_on.value,
        "batch": o.batch_path,
        "batch_size": o.batch_size,
        "seq_len": o.seq_len,
        "seed": o.seed,
        "nonlinearity": o.nonlinearity,
        "dtype": o.dtype,
        "vanish_threshold": o.thresholds.vanish,
        "explode_threshold": o.thresholds.explode,
        "context": o.thresholds.context,
        "train_batch_size": o.train_batch_size,
        "lr": o.lr,
        "optimizer": o.optimizer,
        "model": o.model,
        "model_kwargs": o.model_kwargs,
        "loss": o.loss,
        "device": o.device,
        "max_memory": o.max_memory,
        "state_key": o.state_key,
        "output_key": o.output_key,
        "time_axis": o.time_axis,
        "ignore_index": o.ignore_index,
        "strict_nonfinite": o.strict_nonfinite,
    }


def _file(f: FileDiagnosis) -> dict[str, Any]:
    return {
        "path": f.path,
        "format": f.format,
        "status": f.status.value,
        "verdict": f.verdict.value if f.verdict else None,
        "error": f.error,
        "notes": list(f.notes),
        "nonfinite_weights": [_nonfinite(t) for t in f.nonfinite_weights],
        "batch": None if f.batch is None else {
            "source": f.batch.source,
            "batch_size": f.batch.batch_size,
            "seq_len": f.batch.seq_len,
            "seed": f.batch.seed,
        },
        "loss": f.loss,
        "clip": _clip(f.clip),
        "modules": [_module(m) for m in f.modules],
    }


def _clip(c: ClipSuggestion | None) -> dict[str, Any] | None:
    if c is None:
        return None
    return {
        "suggested_max_norm": _num(c.suggested_max_norm), "decided_by": c.decided_by,
        "expected_norm": _num(c.expected_norm),
        "spread": None if c.spread is None else [_num(x) for x in c.spread],
        "fraction_clipped": c.fraction_clipped, "step_cap": _num(c.step_cap),
        "curvature_cap": _num(c.curvature_cap), "loss_cap": _num(c.loss_cap),
        "examples": c.examples, "parameters": c.parameters,
        "parameter_count": c.parameter_count,
        "inputs": [{"name": i.name, "value": _num(i.value) if isinstance(i.value, float)
                    else i.value, "source": i.source} for i in c.inputs],
        "advice": c.advice,
    }


def _spec(s: ModuleSpec) -> dict[str, Any]:
    return {
        "name": s.name,
        "kind": s.kind.value,
        "input_size": s.input_size,
        "hidden_size": s.hidden_size,
        "proj_size": s.proj_size,
        "num_layers": s.num_layers,
        "bidirectional": s.bidirectional,
        "bias": s.bias,
        "nonlinearity": s.nonlinearity,
        "embedding": s.embedding,
        "embedding_wiring": s.wiring,
        "embedding_candidates": list(s.candidates),
    }


def _module(m: ModuleDiagnosis) -> dict[str, Any]:
    return {
        **_spec(m.spec),
        "inputs": m.inputs,
        "batch_size": m.batch_size,
        "seq_len": m.seq_len,
        "objective": {"name": m.objective, "value": _num(m.loss)},
        "verdict": m.verdict.value,
        "layers": [_layer(layer) for layer in m.layers],
    }


def inspect_document(files: Sequence[InspectDiagnosis],
                     errors: Sequence[str] = ()) -> dict[str, Any]:
    """The document of `rnndiag inspect --format json` (inspect.schema.json); `errors` are
    failures of the run as a whole (a bad option)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "rnndiag", "version": __version__},
        "command": "inspect",
        "exit_code": 2 if errors else int(inspect_exit_code(files)),
        "errors": [{"path": None, "message": e} for e in errors]
        + [{"path": f.path, "message": f.error} for f in files if f.error],
        "files": [{
            "path": f.path, "format": f.format, "status": f.status.value, "error": f.error,
            "notes": list(f.notes),
            "nonfinite_weights": [_nonfinite(t) for t in f.nonfinite_weights],
            "modules": [{**_spec(m.spec), "layers": [_static(x) for x in m.layers]}
                        for m in f.modules],
        } for f in files],
    }


def _nonfinite(t: NonFiniteTensor) -> dict[str, Any]:
    return {"name": t.name, "nan": t.nan, "inf": t.inf, "recurrent": t.recurrent,
            "fatal": t.fatal}


def _static(x: StaticLayer) -> dict[str, Any]:
    return {"layer": x.layer, "direction": x.direction.value,
            "sigma_max_hh": _num(x.sigma_max_hh), "pascanu": x.pascanu.value,
            "forget_bias": _forget_bias(x.forget_bias)}


def _forget_bias(fb: ForgetBias | None) -> dict[str, Any] | None:
    if fb is None:
        return None
    return {"mean": _num(fb.mean), "min": _num(fb.min), "max": _num(fb.max),
            "mean_gate_at_rest": _num(fb.mean_gate_at_rest)}


def _layer(d: LayerDiagnosis) -> dict[str, Any]:
    return {
        "layer": d.layer,
        "direction": d.direction.value,
        "final_step": d.final_step,
        "verdict": d.verdict.value,
        "growth_per_step": _num(d.growth_per_step),
        "horizon": d.horizon,
        "sigma_max_hh": _num(d.sigma_max_hh),
        "pascanu": d.pascanu.value,
        "forget_bias": _forget_bias(d.forget_bias),
        "spans": [_span(s) for s in d.spans],
        "nonfinite_steps": [t for t, (v, r) in enumerate(zip(d.state_grad_norm, d.ratio,
                                                             strict=True))
                            if not math.isfinite(v) or (r is not None and not math.isfinite(r))],
        "grad_norm": _series(d.grad_norm),
        "cell_grad_norm": None if d.cell_grad_norm is None else _series(d.cell_grad_norm),
        "state_grad_norm": _series(d.state_grad_norm),
        "ratio": _series(d.ratio),
        "basis": d.basis.value,
        "references": d.references,
        "skipped_references": d.skipped_references,
        "credit": None if d.credit is None else {
            "positions": list(d.credit.positions),
            "examples": list(d.credit.examples),
            "norms": [_series(row) for row in d.credit.norms],
            "skipped_positions": list(d.credit.skipped)},
    }


def _finding(x: Finding) -> dict[str, Any]:
    return {
        "rule": x.rule.value, "name": x.rule.slug, "level": x.level.value,
        "message": x.message, "path": x.path, "module": x.module, "layer": x.layer,
        "direction": x.direction,
        "span": None if x.span is None else {"start": x.span.start, "end": x.span.end},
        "value": _num(x.value),
        "ignored": x.ignored,
    }


def _advice(a: Advice) -> dict[str, Any]:
    return {"action": a.action, "evidence": [
        {"rule": x.rule.value, "path": x.path, "module": x.module, "layer": x.layer,
         "direction": x.direction} for x in a.evidence]}


def _span(s: Span) -> dict[str, Any]:
    return {"kind": s.kind.value, "start": s.start, "end": s.end,
            "steps": s.end - s.start + 1, "extreme_ratio": _num(s.extreme_ratio)}


def _num(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _series(xs: Sequence[float | None]) -> list[float | None]:
    return [_num(x) for x in xs]
