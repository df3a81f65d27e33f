"""Readers for QA and passage files in the formats the multi-hop QA literature ships.

QA formats (`FileSpec.format`, or `auto` to sniff from the first record's fields):

| format     | layout                 | fields                                                               |
|------------|------------------------|----------------------------------------------------------------------|
| r1searcher | JSONL                  | idx, question, answer (str or list)                                  |
| flashrag   | JSONL                  | id, question, golden_answers[]                                       |
| hotpotqa   | JSON list (or JSONL)   | _id / id, question, answer, supporting_facts, context                |
|            |                        | context: [[title, [sentences]]] or {"title": [...], "sentences": [[...]]} |
|            |                        | (2WikiMultiHopQA uses the same layout)                               |
| ircot      | JSONL                  | question_id, question_text, answers_objects[].spans, contexts[{id, title, paragraph_text, is_supporting}] |
| musique    | JSON list or JSONL     | id, question, answer, answer_aliases, question_decomposition, [paragraphs], [answerable] |

Passage files (`format: passages`): JSONL with `title` + `text` (also KILT pages `wikipedia_title` +
`text: [paragraphs]`, and FlashRAG `contents` = '"title"\\ntext'), or TSV `id<TAB>text`,
`id<TAB>text<TAB>title` (DPR, with or without its header), `idx<TAB>{title}   {passage}` (R1-Searcher's
KILT split) and `idx<TAB>Title: {t} Text: {passage}` (R1-Searcher's HotpotQA abstracts).

Every bad row is an `InputError` naming the file, the line and the field; nothing is silently dropped
(the only rows skipped on purpose are MuSiQue's `answerable: false`, which have no gold answer; they
are counted). Passage files are streamed line by line, so a multi-GB KILT dump is never read whole.
The field mappers (`MAPPERS`) are shared with the Hugging Face source.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from searchrl.data.chunking import clean_kilt
from searchrl.data.schema import Passage, QARecord, answer_text, is_blank, strip_text
from searchrl.errors import InputError
from searchrl.io import read_text_strict

QA_FORMATS = ("r1searcher", "flashrag", "hotpotqa", "ircot", "musique")
ALL_FORMATS = (*QA_FORMATS, "passages")
# The one table of which QA formats carry gold evidence (the field it comes from), i.e. which sources the
# evidence oracle sampler and rewriter can work on (searchrl/training/evidence.py; checked at start-up by
# searchrl/config.py). The metadata kept: gold_titles, and gold_facts [title, sentence] (hotpotqa),
# evidences [s, r, o] (2Wiki), decomposition [{question, answer, title}] (musique).
EVIDENCE_FORMATS = {
    "hotpotqa": "supporting_facts",  # HotpotQA and 2WikiMultiHopQA
    "ircot": "contexts[].is_supporting",
    "musique": "question_decomposition",
}  # r1searcher, flashrag: answers only


class FieldError(ValueError):
    """A bad field inside one record; the reader adds file and line."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field, self.message = field, message


@dataclass
class Mapped:
    """One QA record as read from any format, before it gets its dataset-scoped id."""

    raw_id: str | None
    question: str
    answers: list[str]
    metadata: dict = field(default_factory=dict)
    contexts: list[tuple[str, str]] = field(default_factory=list)  # (title, text) paragraphs


# ----------------------------------------------------------------------------- field helpers
_MISSING = object()


def _get(obj: dict, *keys: str) -> tuple[str, Any]:
    for k in keys:
        if k in obj:
            return k, obj[k]
    return keys[0], _MISSING


def _require(obj: dict, *keys: str) -> tuple[str, Any]:
    key, value = _get(obj, *keys)
    if value is _MISSING:
        raise FieldError(key, f"missing field (present: {', '.join(sorted(map(str, obj))) or 'none'})")
    return key, value


def _question(obj: dict, *keys: str) -> str:
    key, value = _require(obj, *keys)
    if not isinstance(value, str):
        raise FieldError(key, f"expected a string, got {type(value).__name__}")
    if is_blank(value):
        raise FieldError(key, "empty question (nothing but whitespace or invisible characters)")
    return strip_text(value)


def _answers(value: Any, key: str) -> list[str]:
    """A string, finite number or list of them -> non-empty list of distinct non-blank strings
    (`schema.answer_text`: NaN, infinity and null are errors; blank strings are dropped)."""
    if value is None:
        raise FieldError(key, "answer is null")
    items = value if isinstance(value, (list, tuple)) else [value]
    out: list[str] = []
    for v in items:
        try:
            a = answer_text(v)
        except ValueError as err:
            raise FieldError(key, str(err)) from None
        if a and a not in out:
            out.append(a)
    if not out:
        raise FieldError(key, "empty answer list" if isinstance(value, (list, tuple)) else "empty answer")
    return out


def _raw_id(obj: dict, *keys: str) -> str | None:
    _, value = _get(obj, *keys)
    if value is _MISSING or value is None or value == "":
        return None
    return str(value)


# ----------------------------------------------------------------------------- QA mappers
def map_r1searcher(obj: dict) -> Mapped:
    question = _question(obj, "question", "Question")
    key, value = _require(obj, "answer", "answers", "Answer", "golden_answers")
    return Mapped(_raw_id(obj, "idx", "id"), question, _answers(value, key))


def map_flashrag(obj: dict) -> Mapped:
    question = _question(obj, "question")
    key, value = _require(obj, "golden_answers")
    return Mapped(_raw_id(obj, "id"), question, _answers(value, key))


def _paragraph_pairs(context: Any) -> list[tuple[str, list[str]]]:
    """HotpotQA / 2Wiki context in either layout -> [(title, sentences)]."""
    if isinstance(context, dict):
        titles = context.get("title")
        sentences = context.get("sentences", context.get("content"))
        if not isinstance(titles, list) or not isinstance(sentences, list) or len(titles) != len(sentences):
            raise FieldError("context", "expected {'title': [...], 'sentences': [[...]]} with equal lengths")
        pairs = list(zip(titles, sentences, strict=True))
    elif isinstance(context, list):
        pairs = []
        for i, item in enumerate(context):
            if not (isinstance(item, (list, tuple)) and len(item) == 2):
                raise FieldError("context", f"item {i}: expected [title, [sentences]]")
            pairs.append((item[0], item[1]))
    else:
        raise FieldError("context", f"expected a list or an object, got {type(context).__name__}")
    out = []
    for i, (title, sents) in enumerate(pairs):
        if isinstance(sents, str):
            sents = [sents]
        if not isinstance(title, str) or not isinstance(sents, list):
            raise FieldError("context", f"paragraph {i}: expected a title string and a list of sentences")
        out.append((title, [str(s) for s in sents]))
    return out


def _supporting_titles(facts: Any) -> list[str]:
    if isinstance(facts, dict):
        titles = facts.get("title") or []
    elif isinstance(facts, list):
        titles = [f[0] for f in facts if isinstance(f, (list, tuple)) and f]
    else:
        raise FieldError("supporting_facts", f"expected a list or an object, got {type(facts).__name__}")
    return list(dict.fromkeys(str(t) for t in titles))


def map_hotpotqa(obj: dict) -> Mapped:
    question = _question(obj, "question")
    key, value = _require(obj, "answer", "answers")
    answers = _answers(value, key)
    meta: dict = {k: obj[k] for k in ("type", "level") if isinstance(obj.get(k), str)}
    pairs = _paragraph_pairs(obj["context"]) if "context" in obj else []
    if "supporting_facts" in obj:
        meta["gold_titles"] = _supporting_titles(obj["supporting_facts"])
        meta["gold_facts"] = _supporting_sentences(obj["supporting_facts"], pairs)
    if isinstance(obj.get("evidences"), list):  # 2WikiMultiHopQA's [subject, relation, object] triples
        meta["evidences"] = [[str(x) for x in e] for e in obj["evidences"] if isinstance(e, (list, tuple)) and len(e) == 3]
    contexts = []
    for title, sents in pairs:
        text = " ".join(strip_text(s) for s in sents if not is_blank(s))
        if text:
            contexts.append((strip_text(title), text))
    return Mapped(_raw_id(obj, "_id", "id"), question, answers, meta, contexts)


def _supporting_sentences(facts: Any, pairs: list[tuple[str, list[str]]]) -> list[list[str]]:
    """[title, sentence] for each supporting fact [title, sentence index] found in the context."""
    if isinstance(facts, dict):
        items = list(zip(facts.get("title") or [], facts.get("sent_id") or [], strict=False))
    else:
        items = [f for f in facts if isinstance(f, (list, tuple)) and len(f) == 2]
    sentences = {str(t): s for t, s in pairs}
    out = []
    for title, idx in items:
        sents = sentences.get(str(title), [])
        if isinstance(idx, int) and 0 <= idx < len(sents) and not is_blank(sents[idx]):
            out.append([str(title), strip_text(sents[idx])])
    return out


def map_ircot(obj: dict) -> Mapped:
    question = _question(obj, "question_text", "question")
    _, objects = _require(obj, "answers_objects")
    if not isinstance(objects, list):
        raise FieldError("answers_objects", f"expected a list, got {type(objects).__name__}")
    spans: list = []
    for o in objects:
        if not isinstance(o, dict):
            raise FieldError("answers_objects", "expected objects with 'spans'")
        spans.extend(o.get("spans") or [])
    answers = _answers(spans, "answers_objects[].spans")
    contexts, gold = [], []
    for i, c in enumerate(obj.get("contexts") or []):
        if not isinstance(c, dict) or not isinstance(c.get("paragraph_text"), str):
            raise FieldError("contexts", f"item {i}: expected an object with 'title' and 'paragraph_text'")
        title, text = str(c.get("title") or ""), strip_text(c["paragraph_text"])
        if text:
            contexts.append((strip_text(title), text))
        if c.get("is_supporting") and title not in gold:
            gold.append(title)
    return Mapped(_raw_id(obj, "question_id", "id"), question, answers, {"gold_titles": gold}, contexts)


_DOC_SUFFIX = re.compile(r"_\d+$")


def map_musique(obj: dict) -> Mapped | None:
    if obj.get("answerable") is False:  # MuSiQue-Full's unanswerable contrast questions
        return None
    question = _question(obj, "question")
    key, value = _require(obj, "answer")
    aliases = obj.get("answer_aliases") or []
    answers = _answers([value, *aliases] if isinstance(aliases, list) else value, key)
    contexts, gold = [], []
    for i, p in enumerate(obj.get("paragraphs") or []):
        if not isinstance(p, dict) or not isinstance(p.get("paragraph_text"), str):
            raise FieldError("paragraphs", f"item {i}: expected an object with 'title' and 'paragraph_text'")
        title = str(p.get("title") or "")
        if not is_blank(p["paragraph_text"]):
            contexts.append((strip_text(title), strip_text(p["paragraph_text"])))
        if p.get("is_supporting") and title not in gold:
            gold.append(title)
    decomposition = []
    for i, step in enumerate(obj.get("question_decomposition") or []):
        if not isinstance(step, dict):
            raise FieldError("question_decomposition", f"item {i}: expected an object")
        title = _DOC_SUFFIX.sub("", str(step.get("document_id") or ""))
        if not title and isinstance(step.get("paragraph_support_idx"), int):
            paragraphs = obj.get("paragraphs") or []
            if 0 <= step["paragraph_support_idx"] < len(paragraphs):
                title = str(paragraphs[step["paragraph_support_idx"]].get("title") or "")
        decomposition.append({"question": str(step.get("question", "")), "answer": str(step.get("answer", "")),
                              "title": title})
        if title and not obj.get("paragraphs") and title not in gold:
            gold.append(title)
    meta = {"gold_titles": gold, "decomposition": decomposition, "n_hops": len(decomposition)}
    return Mapped(_raw_id(obj, "id"), question, answers, meta, contexts)


MAPPERS: dict[str, Callable[[dict], Mapped | None]] = {
    "r1searcher": map_r1searcher, "flashrag": map_flashrag, "hotpotqa": map_hotpotqa, "ircot": map_ircot,
    "musique": map_musique,
}


def format_from_keys(keys) -> str | None:
    """Guess the format from one record's field names; None when nothing fits."""
    k = set(keys)
    if {"question_text", "answers_objects"} <= k:
        return "ircot"
    if "golden_answers" in k and "question" in k:
        return "flashrag"
    if "question" in k and ("question_decomposition" in k or "answer_aliases" in k or "paragraphs" in k):
        return "musique"
    if "question" in k and "context" in k:
        return "hotpotqa"
    if ("question" in k and k & {"answer", "answers"}) or {"Question", "Answer"} <= k:
        return "r1searcher"
    if "question" not in k and k & {"text", "contents", "paragraph_text"}:
        return "passages"
    return None


# ----------------------------------------------------------------------------- low-level readers
def iter_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 file, streamed; a bad byte names the file and line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise InputError(path, f"not valid UTF-8 (byte {err.start} of the line: "
                                       f"{raw[err.start:err.start + 1]!r})", row=lineno,
                                 fix="re-encode the file as UTF-8") from None
            yield lineno, line.lstrip("\ufeff") if lineno == 1 else line


def _first_char(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(4096)
    return head.decode("utf-8", errors="ignore").lstrip("\ufeff \t\r\n")[:1]


def iter_json_array(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, element) of a file holding one JSON array, with the line where each element starts."""
    text = read_text_strict(path)
    decoder = json.JSONDecoder()
    ws = re.compile(r"[\s\ufeff]*")
    i = ws.match(text, 0).end()
    if text[i:i + 1] != "[":
        raise InputError(path, "expected a JSON array", row=text.count("\n", 0, i) + 1)
    i = ws.match(text, i + 1).end()
    line, pos = 1, 0
    if text[i:i + 1] == "]":
        return
    while True:
        line += text.count("\n", pos, i)
        pos = i
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as err:
            raise InputError(path, f"malformed JSON ({err.msg} at column {err.colno})", row=err.lineno) from None
        yield line, obj
        i = ws.match(text, end).end()
        if text[i:i + 1] == ",":
            i = ws.match(text, i + 1).end()
        elif text[i:i + 1] == "]":
            return
        else:
            row = text.count("\n", 0, i) + 1
            raise InputError(path, "malformed JSON (expected ',' or ']' after an element)", row=row)


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, object) per non-empty line, streamed (unlike searchrl.io.iter_jsonl, which reads
    the whole file: passage dumps can be many GB)."""
    for lineno, line in iter_lines(path):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(path, f"malformed JSON ({err.msg} at column {err.colno})", row=lineno) from None


def iter_objects(path: str | Path) -> Iterator[tuple[int, dict]]:
    """JSON objects of a JSONL file or of a JSON array file (told apart by the first character)."""
    rows = iter_json_array(path) if _first_char(Path(path)) == "[" else iter_jsonl(path)
    for lineno, obj in rows:
        if not isinstance(obj, dict):
            raise InputError(path, f"expected a JSON object, got {type(obj).__name__}", row=lineno)
        yield lineno, obj


def detect_format(path: str | Path) -> str:
    """The format of a QA or passage file, from its extension (.tsv) or its first record's fields."""
    path = Path(path)
    if path.suffix.lower() == ".tsv":
        return "passages"
    for lineno, obj in iter_objects(path):
        fmt = format_from_keys(obj)
        if fmt is None:
            raise InputError(path, f"cannot tell the format from the fields {sorted(obj)}", row=lineno,
                             fix=f"set format: to one of {', '.join(ALL_FORMATS)}")
        return fmt
    raise InputError(path, "file is empty (no records)", fix="check the path, or remove the file from params")


def stable_passage_id(dataset: str, title: str, text: str) -> str:
    digest = hashlib.sha1(f"{title}\n{text}".encode()).hexdigest()[:16]
    return f"{dataset}-{digest}"


# ----------------------------------------------------------------------------- QA files
@dataclass
class QAFile:
    path: str
    format: str
    split: str
    records: list[QARecord]
    lines: list[int]  # line of each record in the file
    contexts: list[Passage]  # paragraphs found inside the records (HotpotQA context, IRCoT contexts...)
    context_lines: list[int]
    skipped: int = 0  # MuSiQue unanswerable rows


def map_rows(rows, fmt: str, source: str, dataset: str, split: str, limit: int = 0) -> QAFile:
    """Map (line, object) rows with the `fmt` mapper into QA records and context passages.

    `source` names the input in errors (a file path, or `hub-id[split]` for the hf source).
    """
    if fmt not in MAPPERS:
        raise InputError(source, f"'{fmt}' is not a QA format", fix=f"use one of {', '.join(QA_FORMATS)}")
    mapper = MAPPERS[fmt]
    out = QAFile(source, fmt, split, [], [], [], [])
    first_line: dict[str, int] = {}
    for n, (lineno, obj) in enumerate(rows, start=1):
        if limit and len(out.records) >= limit:
            break
        try:
            m = mapper(obj)
        except FieldError as err:
            raise InputError(source, err.message, row=lineno, field=err.field) from None
        if m is None:
            out.skipped += 1
            continue
        raw = m.raw_id if m.raw_id is not None else str(n)
        if raw in first_line:
            raise InputError(source, f"duplicate id {raw!r} (also on line {first_line[raw]})", row=lineno,
                             field="id", fix="ids must be unique within a file")
        first_line[raw] = lineno
        meta = {**m.metadata, "source_id": raw}
        out.records.append(QARecord(f"{dataset}-{raw}", dataset, split, m.question, m.answers, meta))
        out.lines.append(lineno)
        for title, text in m.contexts:
            out.contexts.append(Passage(stable_passage_id(dataset, title, text), title, text, dataset))
            out.context_lines.append(lineno)
    return out


def read_qa_file(path: str | Path, fmt: str = "auto", dataset: str | None = None, split: str = "eval",
                 limit: int = 0) -> QAFile:
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file not found")
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt == "passages":
        raise InputError(path, "this is a passage file, listed as a QA file",
                         fix="list it under corpus:, or set its format")
    return map_rows(iter_objects(path), fmt, str(path), dataset or path.stem, split, limit)


# ----------------------------------------------------------------------------- passage files
@dataclass
class PassageFile:
    path: str
    passages: list[Passage]
    lines: list[int]


def _passage_from_object(obj: dict) -> tuple[str | None, str, str]:
    """(raw id, title, text) from a passage object in any supported JSONL layout."""
    raw = _raw_id(obj, "id", "_id", "docid", "doc_id", "wikipedia_id")
    if "contents" in obj and "text" not in obj:  # FlashRAG: '"Title"\ntext'
        contents = obj["contents"]
        if not isinstance(contents, str):
            raise FieldError("contents", f"expected a string, got {type(contents).__name__}")
        # as FlashRAG reads it (title = contents.split("\n")[0], text = the rest), but a row without a
        # newline is all text and has no title (FlashRAG would make the whole row its title)
        head, newline, body = contents.partition("\n")
        title = obj.get("title") if isinstance(obj.get("title"), str) else ""
        if newline:
            title = title or strip_text(head).strip('"')
            text = body
        else:
            text = contents
        return raw, strip_text(title), strip_text(text)
    title_key, title = _get(obj, "title", "wikipedia_title")
    title = "" if title is _MISSING or title is None else title
    if not isinstance(title, str):
        raise FieldError(title_key, f"expected a string, got {type(title).__name__}")
    key, text = _require(obj, "text", "paragraph_text", "contents")
    if isinstance(text, list):  # KILT page: list of paragraphs, the first one repeating the title
        paragraphs = [str(t).strip() for t in text]
        if paragraphs and paragraphs[0] == title.strip():
            paragraphs = paragraphs[1:]
        text = clean_kilt(" ".join(p for p in paragraphs if p))
    if not isinstance(text, str):
        raise FieldError(key, f"expected a string, got {type(text).__name__}")
    return raw, strip_text(title), strip_text(text)


_TITLE_TEXT = re.compile(r'^"?Title:\s*(.*?)\s+Text:\s*(.*?)"?$', re.S)


def _split_tsv_body(body: str) -> tuple[str, str]:
    """R1-Searcher corpus bodies: 'Title: t Text: passage' or '{title}   {passage}'; else no title."""
    m = _TITLE_TEXT.match(body)
    if m:
        return m.group(1).strip(), m.group(2).strip()
    if "   " in body:
        title, _, text = body.partition("   ")
        return title.strip(), text.strip()
    return "", body.strip()


def _unquote(s: str) -> str:
    s = s.strip()
    if len(s) >= 2 and s[0] == s[-1] == '"':
        return s[1:-1].replace('""', '"')
    return s


def _iter_tsv(path: Path) -> Iterator[tuple[int, tuple[str | None, str, str]]]:
    columns: list[str] | None = None
    for lineno, line in iter_lines(path):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        cells = line.split("\t")
        if columns is None and lineno == 1 and cells[0].strip().lower() in ("id", "idx", "docid"):
            columns = [c.strip().lower() for c in cells]  # a header row (DPR: id, text, title)
            continue
        if columns:
            if len(cells) != len(columns):
                raise InputError(path, f"expected {len(columns)} tab-separated columns ({', '.join(columns)}), "
                                       f"got {len(cells)}", row=lineno)
            row = dict(zip(columns, cells, strict=True))
            if "text" not in row:
                raise InputError(path, "header has no 'text' column", row=1, field="text")
            yield lineno, (row.get("id") or row.get("idx") or row.get("docid"), _unquote(row.get("title", "")),
                           _unquote(row["text"]))
        elif len(cells) == 2:
            title, text = _split_tsv_body(_unquote(cells[1]))
            yield lineno, (cells[0].strip() or None, title, text)
        elif len(cells) == 3:
            yield lineno, (cells[0].strip() or None, _unquote(cells[2]), _unquote(cells[1]))
        else:
            raise InputError(path, f"expected 2 or 3 tab-separated columns (id, text[, title]), got {len(cells)}",
                             row=lineno)


def read_passage_file(path: str | Path, dataset: str | None = None, limit: int = 0) -> PassageFile:
    """Passages of one corpus file (JSONL / JSON list / TSV); ids `<dataset>-<id>` or a content hash."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file not found")
    dataset = dataset or path.stem
    if path.suffix.lower() == ".tsv":
        rows: Iterator = _iter_tsv(path)
    else:
        def _rows():
            for lineno, obj in iter_objects(path):
                try:
                    yield lineno, _passage_from_object(obj)
                except FieldError as err:
                    raise InputError(path, err.message, row=lineno, field=err.field) from None
        rows = _rows()
    out = PassageFile(str(path), [], [])
    first_line: dict[str, int] = {}
    for lineno, (raw, title, text) in rows:
        if limit and len(out.passages) >= limit:
            break
        if is_blank(text):
            raise InputError(path, "empty passage text", row=lineno, field="text",
                             fix="remove the row or give it text")
        text, title = strip_text(text), strip_text(title)
        if raw is not None:
            if raw in first_line:
                raise InputError(path, f"duplicate passage id {raw!r} (also on line {first_line[raw]})", row=lineno,
                                 field="id", fix="ids must be unique within a file")
            first_line[raw] = lineno
            pid = f"{dataset}-{raw}"
        else:
            pid = stable_passage_id(dataset, title, text)
        out.passages.append(Passage(pid, title, text, dataset))
        out.lines.append(lineno)
    if not out.passages:
        raise InputError(path, "empty corpus file: no passages found",
                         fix="check the path and format, or remove the file from the corpus list")
    return out
