"""Expectation suites per kind of frame, declared without importing Great Expectations.

A suite is a list of `Expect(gx_class_name, kwargs)` plus the frame it runs on. Checks GX cannot
express on raw values (a list column, tag balance in a trajectory) become *computed columns*, named
`_<what>`, added to a copy of the frame by the builder and then checked with plain expectations:

    qa          id/dataset/split/question/answers/metadata; unique id; non-blank question
                (`_question_not_blank`); answers a non-empty list of non-blank strings (`_answers_ok`);
                split in `splits`
    corpus      >= 1 row; id/title/text; unique id; non-blank text (`_text_not_blank`)
    predictions id/question/prediction/golds/method/em/f1/cem/retrievals; (id, method) unique, or
                (id, method, sample) with a `sample` column (several samples per question); em, f1,
                cem (and lasj, when judged) in [0, 1]; judge in True/False/unparseable; retrievals
                >= 0; golds a non-empty list of non-blank strings
    sft         text/answer/retrievals; non-blank answer; for every tag pair, as many opens as
                closes per example (`_n_open_<tag>` == `_n_close_<tag>`); every document block
                comes after a query (`_documents_after_query`); length in [min_tokens, max_tokens]

Builders take keyword options (`validate_frame(df, "sft", name, max_tokens=1024, ...)`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from searchrl.data.schema import is_blank

QA_SPLITS = ("train", "eval", "dev", "validation", "test")

# R1-Searcher++ protocol (METHOD.md A.2): name -> (open, close)
PP_TAGS: dict[str, tuple[str, str]] = {
    "internal": ("<internal>", "</internal>"),
    "external": ("<external>", "</external>"),
    "document": ("<document>", "</document>"),
}


@dataclass(frozen=True)
class Expect:
    """One expectation: a class name of `great_expectations.expectations` and its arguments."""

    type: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    note: str = ""  # plain-words meaning, shown in failure messages (computed columns)

    def columns(self) -> list[str]:
        cols = [self.kwargs[k] for k in ("column", "column_A", "column_B") if k in self.kwargs]
        return cols + list(self.kwargs.get("column_list", []))


@dataclass
class Suite:
    kind: str
    frame: pd.DataFrame  # the input plus computed columns
    expectations: list[Expect]


def _exist(columns: Sequence[str]) -> list[Expect]:
    return [Expect("ExpectColumnToExist", {"column": c}) for c in columns]


def not_blank(value: Any) -> bool:
    """A string with something visible in it (`schema.is_blank`: whitespace and invisible formatting
    characters such as a zero-width space do not count)."""
    return isinstance(value, str) and not is_blank(value)


def _non_empty_text(df: pd.DataFrame, column: str) -> list[Expect]:
    """`column` not null, and not blank (computed column `_<column>_not_blank`; nulls are left to the
    null check, so each bad row is reported once)."""
    def ok(v: Any) -> bool:
        return v is None or (isinstance(v, float) and v != v) or not_blank(v)

    _with(df, f"_{column}_not_blank", column, ok)
    return [Expect("ExpectColumnValuesToNotBeNull", {"column": column}),
            _is_true(f"_{column}_not_blank", f"{column} must not be blank (only whitespace or invisible characters)")]


def _is_true(column: str, note: str) -> Expect:
    return Expect("ExpectColumnValuesToBeInSet", {"column": column, "value_set": [True]}, note)


def non_empty_string_list(value: Any) -> bool:
    """A list (or tuple / numpy array, as read back from parquet) of >= 1 non-blank strings."""
    if isinstance(value, (str, bytes, Mapping)) or not hasattr(value, "__len__") or len(value) == 0:
        return False
    return all(not_blank(v) for v in value)


def _with(df: pd.DataFrame, name: str, source: str, fn: Callable[[Any], Any]) -> None:
    """Add computed column `name` = fn(df[source]) when `source` exists (else ExpectColumnToExist fails)."""
    if source in df.columns:
        df[name] = [fn(v) for v in df[source]]


# ----------------------------------------------------------------------------- kinds
def qa_suite(df: pd.DataFrame, splits: Sequence[str] = QA_SPLITS) -> Suite:
    df = df.copy()
    _with(df, "_answers_ok", "answers", non_empty_string_list)
    return Suite("qa", df, [
        *_exist(["id", "dataset", "split", "question", "answers", "metadata"]),
        Expect("ExpectColumnValuesToNotBeNull", {"column": "id"}),
        Expect("ExpectColumnValuesToBeUnique", {"column": "id"}),
        *_non_empty_text(df, "question"),
        _is_true("_answers_ok", "answers must be a non-empty list of non-blank strings"),
        Expect("ExpectColumnValuesToBeInSet", {"column": "split", "value_set": list(splits)}),
    ])


def corpus_suite(df: pd.DataFrame) -> Suite:
    df = df.copy()
    return Suite("corpus", df, [
        Expect("ExpectTableRowCountToBeBetween", {"min_value": 1}),
        *_exist(["id", "title", "text"]),
        Expect("ExpectColumnValuesToNotBeNull", {"column": "id"}),
        Expect("ExpectColumnValuesToBeUnique", {"column": "id"}),
        *_non_empty_text(df, "text"),
    ])


def predictions_suite(df: pd.DataFrame) -> Suite:
    df = df.copy()
    _with(df, "_golds_ok", "golds", non_empty_string_list)
    judged = ("lasj",) if "lasj" in df.columns else ()
    scores = [e for c in ("em", "f1", "cem", *judged) for e in (
        Expect("ExpectColumnValuesToNotBeNull", {"column": c}),
        Expect("ExpectColumnValuesToBeBetween", {"column": c, "min_value": 0, "max_value": 1}))]
    if judged and "judge" in df.columns:
        scores.append(Expect("ExpectColumnValuesToBeInSet",
                             {"column": "judge", "value_set": ["True", "False", "unparseable"]}))
    key = ["id", "method", "sample"] if "sample" in df.columns else ["id", "method"]
    return Suite("predictions", df, [
        *_exist(["id", "question", "prediction", "golds", "method", "em", "f1", "cem", "retrievals"]),
        Expect("ExpectColumnValuesToNotBeNull", {"column": "id"}),
        Expect("ExpectCompoundColumnsToBeUnique", {"column_list": key}),
        Expect("ExpectColumnValuesToNotBeNull", {"column": "prediction"}),
        _is_true("_golds_ok", "golds must be a non-empty list of non-blank strings"),
        *scores,
        Expect("ExpectColumnValuesToNotBeNull", {"column": "retrievals"}),
        Expect("ExpectColumnValuesToBeBetween", {"column": "retrievals", "min_value": 0}),
    ])


def documents_after_query(text: str, query_close: str, doc_open: str) -> bool:
    """Every `doc_open` is preceded by a `query_close` not already answered by an earlier document,
    i.e. documents are inserted only by the retriever (no self-written documents, METHOD.md A.3)."""
    pending = 0
    for m in re.finditer(f"{re.escape(query_close)}|{re.escape(doc_open)}", text):
        if m.group() == query_close:
            pending = 1
        elif pending:
            pending = 0
        else:
            return False
    return True


def sft_suite(df: pd.DataFrame, tags: Mapping[str, tuple[str, str]] = PP_TAGS, query_tag: str = "external",
              document_tag: str = "document", min_tokens: int = 1, max_tokens: int | None = None,
              count_tokens: Callable[[str], int] | None = None) -> Suite:
    """Trajectory training data. `tags` maps a name to its (open, close) strings, so the R1-Searcher
    protocol can pass e.g. {"query": ("<|begin_of_query|>", "<|end_of_query|>"), ...}. Length is
    `count_tokens(text)` (pass `lambda s: len(tok(s).input_ids)`); default: whitespace words."""
    if query_tag not in tags or document_tag not in tags:
        raise ValueError(f"sft suite: query_tag '{query_tag}' and document_tag '{document_tag}' "
                         f"must be keys of tags ({', '.join(tags)})")
    count = count_tokens or (lambda s: len(s.split()))
    df = df.copy()
    checks: list[Expect] = []
    for name, (open_, close) in tags.items():
        _with(df, f"_n_open_{name}", "text", lambda s, t=open_: str(s).count(t))
        _with(df, f"_n_close_{name}", "text", lambda s, t=close: str(s).count(t))
        checks.append(Expect("ExpectColumnPairValuesToBeEqual",
                             {"column_A": f"_n_open_{name}", "column_B": f"_n_close_{name}"},
                             f"text must contain as many {open_} as {close}"))
    q_close, d_open = tags[query_tag][1], tags[document_tag][0]
    _with(df, "_documents_after_query", "text", lambda s: documents_after_query(str(s), q_close, d_open))
    _with(df, "_n_tokens", "text", lambda s: count(str(s)))
    length = {"column": "_n_tokens", "min_value": min_tokens}
    if max_tokens is not None:
        length["max_value"] = max_tokens
    return Suite("sft", df, [
        Expect("ExpectTableRowCountToBeBetween", {"min_value": 1}),
        *_exist(["text", "answer", "retrievals"]),
        Expect("ExpectColumnValuesToNotBeNull", {"column": "text"}),
        *_non_empty_text(df, "answer"),
        Expect("ExpectColumnValuesToNotBeNull", {"column": "retrievals"}),
        Expect("ExpectColumnValuesToBeBetween", {"column": "retrievals", "min_value": 0}),
        *checks,
        _is_true("_documents_after_query", f"every {d_open} must follow a {q_close} (retriever output only)"),
        Expect("ExpectColumnValuesToBeBetween", length,
               f"text length must be in [{min_tokens}, {max_tokens if max_tokens is not None else 'inf'}] tokens"),
    ])


SUITES: dict[str, Callable[..., Suite]] = {
    "qa": qa_suite,
    "corpus": corpus_suite,
    "predictions": predictions_suite,
    "sft": sft_suite,
}


def build_suite(df: pd.DataFrame, kind: str, **options: Any) -> Suite:
    if kind not in SUITES:
        raise ValueError(f"unknown validation kind '{kind}' (known: {', '.join(SUITES)})")
    return SUITES[kind](df, **options)
