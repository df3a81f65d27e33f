"""Great Expectations gates between stages: `validate_frame(df, kind, name)`.

Runs the suite of `kind` (see `suites.py`) on an in-memory GX 1.x ephemeral context, always writes
`<report_dir>/<name>.json`, returns that report when every expectation holds and otherwise raises
`DataValidationError` with one line per failed expectation, e.g.

    qa 'eval' failed validation: 1 of 12 expectations failed (120 rows)
      - expect_column_values_to_be_unique on 'id': 2 of 120 rows, e.g. id 'kw-7', 'kw-7'
    report: reports/validation/eval.json

great_expectations is imported inside the call (about 2 s), so importing this module is cheap.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd

from searchrl.errors import DataValidationError
from searchrl.io import atomic_path
from searchrl.validation.suites import SUITES, Expect, Suite, build_suite

__all__ = ["validate_frame", "build_suite", "SUITES", "Expect", "Suite"]

N_EXAMPLES = 5


def validate_frame(df: pd.DataFrame, kind: str, name: str, report_dir: str | os.PathLike = "reports/validation",
                   **options: Any) -> dict:
    """Validate `df` with the `kind` suite ("qa", "corpus", "predictions", "sft"); `options` go to
    the suite builder (e.g. `splits=` for qa; `tags=`, `min_tokens=`, `max_tokens=`, `count_tokens=`
    for sft). Returns the report dict; raises DataValidationError if any expectation fails."""
    suite = build_suite(df, kind, **options)
    present = set(suite.frame.columns)
    # a check on a missing column would only raise; its ExpectColumnToExist already fails
    runnable = [i for i, e in enumerate(suite.expectations)
                if e.type == "ExpectColumnToExist" or set(e.columns()) <= present]
    id_column = "id" if "id" in present else None
    results = dict(zip(runnable, _run_gx(suite.frame, [suite.expectations[i] for i in runnable],
                                         f"{kind}-{name}", id_column), strict=True))
    entries = []
    for i, exp in enumerate(suite.expectations):
        if i in results:
            entries.append(_entry(exp, results[i], len(df), id_column))
        else:
            missing = sorted(set(exp.columns()) - present)
            entries.append({**_describe(exp), "success": None, "skipped": f"missing column(s) {missing}"})
    failed = [e for e in entries if e["success"] is False]
    path = Path(report_dir) / f"{name}.json"
    report = {
        "name": name, "kind": kind, "success": not failed, "n_rows": len(df),
        "n_expectations": len(runnable), "n_failed": len(failed), "report": str(path),
        "expectations": entries,
    }
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_jsonable(report), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if failed:
        raise DataValidationError(_message(report, failed, id_column))
    return report


# ----------------------------------------------------------------------------- GX
def _run_gx(frame: pd.DataFrame, expectations: list[Expect], name: str, id_column: str | None) -> list:
    """Results of `expectations` on `frame`, in the same order."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch_def = ctx.data_sources.add_pandas("searchrl").add_dataframe_asset(name) \
        .add_batch_definition_whole_dataframe("all")
    suite = ctx.suites.add(gx.ExpectationSuite(
        name=name, expectations=[getattr(gx.expectations, e.type)(**e.kwargs) for e in expectations]))
    result_format: dict[str, Any] = {"result_format": "SUMMARY", "partial_unexpected_count": N_EXAMPLES}
    if id_column:
        result_format["unexpected_index_column_names"] = [id_column]
    res = batch_def.get_batch(batch_parameters={"dataframe": frame}).validate(suite, result_format=result_format)
    by_id = {r.expectation_config.id: r for r in res.results}
    return [by_id[e.id] for e in suite.expectations]


def _describe(exp: Expect) -> dict:
    cols = exp.columns()
    args = {k: v for k, v in exp.kwargs.items() if k not in ("column", "column_A", "column_B", "column_list")}
    return {"type": _snake(exp.type), "column": "+".join(cols) if cols else None, "kwargs": args, "note": exp.note}


def _entry(exp: Expect, r, n_rows: int, id_column: str | None) -> dict:
    out = _describe(exp)
    res = dict(r.result or {})
    out["success"] = bool(r.success)
    if r.exception_info and r.exception_info.get("raised_exception"):
        out["success"] = False
        out["exception"] = r.exception_info.get("exception_message")
    if "unexpected_count" in res:
        out["unexpected_count"] = int(res["unexpected_count"])
        out["element_count"] = int(res.get("element_count", n_rows))
        index = res.get("partial_unexpected_index_list") or []
        out["unexpected_examples"] = [
            (row.get(id_column) if isinstance(row, dict) else row) for row in index][:N_EXAMPLES]
        out["unexpected_values"] = [_short(v) for v in (res.get("partial_unexpected_list") or [])][:N_EXAMPLES]
    if "observed_value" in res:
        out["observed_value"] = res["observed_value"]
    return out


# ----------------------------------------------------------------------------- message / JSON
def _message(report: dict, failed: list[dict], id_column: str | None) -> str:
    head = (f"{report['kind']} '{report['name']}' failed validation: {len(failed)} of "
            f"{report['n_expectations']} expectations failed ({report['n_rows']} rows)")
    lines = [head]
    for e in failed:
        what = e["type"] + (f" on '{e['column']}'" if e["column"] else "")
        if e["kwargs"]:
            what += " (" + ", ".join(f"{k}={v!r}" for k, v in e["kwargs"].items()) + ")"
        if e.get("exception"):
            detail = f"error: {e['exception']}"
        elif "unexpected_count" in e:
            label = id_column or "row"
            examples = ", ".join(repr(x) for x in e["unexpected_examples"])
            detail = f"{e['unexpected_count']} of {e['element_count']} rows, e.g. {label} {examples}"
            if e["unexpected_values"] and e["column"] != id_column and not e["column"].startswith("_"):
                detail += f" (values {', '.join(repr(v) for v in e['unexpected_values'])})"
        elif "observed_value" in e:
            detail = f"observed {e['observed_value']!r}"
        elif e["type"] == "expect_column_to_exist":
            detail = "column missing"
        else:
            detail = "failed"
        lines.append(f"  - {what}: {detail}" + (f" [{e['note']}]" if e["note"] else ""))
    lines.append(f"report: {report['report']}")
    return "\n".join(lines)


def _snake(class_name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in class_name).lstrip("_")


def _short(value: Any, limit: int = 80) -> Any:
    if isinstance(value, str) and len(value) > limit:
        return value[:limit] + "..."
    return value


def _jsonable(obj: Any) -> Any:
    """Plain JSON: numpy values to Python, NaN/inf to null, anything else unknown to str."""
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):  # numpy scalars and arrays
        obj = obj.tolist()
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    return str(obj)
