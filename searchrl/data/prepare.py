"""The prepare stage's library half: one interface over the three sources, and the common finish.

    data = load_source(params, answer_fn)   # knowledge_world | jsonl | hf  -> PreparedData
    data = finalize(data)                   # de-duplicate, check ids, contamination, stats
    write_outputs(data, out_dir)            # train/eval/seen/corpus.parquet, contamination.json, stats.json

`seen.parquet` is always written (empty outside the Knowledge World) so the DVC stage has a fixed set
of outputs. `stats.json` is the stage's DVC metrics file: numbers only.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from searchrl.config import Params, resolve_input
from searchrl.data import formats
from searchrl.data.chunking import chunk_passage
from searchrl.data.knowledge_world import AnswerFn
from searchrl.data.schema import Passage, QARecord, passage_frame, qa_frame
from searchrl.errors import InputError
from searchrl.io import atomic_path, write_json
from searchrl.metrics import normalize_answer

log = logging.getLogger(__name__)

QA_SPLITS = ("train", "eval")
EXTRA_SPLITS = ("seen",)  # always written, possibly empty


@dataclass
class PreparedData:
    train: list[QARecord]
    eval: list[QARecord]
    corpus: list[Passage]
    extra_splits: dict[str, list[QARecord]] = field(default_factory=dict)
    # where each item came from ("file, line N"), parallel to the lists above; empty when generated
    origins: dict[str, list[str]] = field(default_factory=dict)
    stats: dict = field(default_factory=dict)  # source-specific numbers (probe, skipped rows)
    contamination: dict = field(default_factory=dict)

    def splits(self) -> dict[str, list[QARecord]]:
        return {"train": self.train, "eval": self.eval, **self.extra_splits}

    def frames(self) -> dict[str, tuple[str, pd.DataFrame]]:
        """name -> (validation kind, frame) for every output file."""
        out = {name: ("qa", qa_frame(recs)) for name, recs in self.splits().items()}
        for name in EXTRA_SPLITS:
            out.setdefault(name, ("qa", qa_frame([])))
        out["corpus"] = ("corpus", passage_frame(self.corpus))
        return out


# ----------------------------------------------------------------------------- sources
def load_source(params: Params, answer_fn: AnswerFn | None = None, prompt_key: str = "") -> PreparedData:
    """Read or generate the data of `params.prepare.source` (not yet de-duplicated)."""
    cfg = params.prepare
    if cfg.source == "knowledge_world":
        return load_knowledge_world(params, answer_fn, prompt_key)
    if cfg.source == "jsonl":
        return load_jsonl_source(cfg.jsonl)
    return load_hf_source(cfg.hf)


def load_knowledge_world(params: Params, answer_fn: AnswerFn | None = None, prompt_key: str = "") -> PreparedData:
    from searchrl.data import knowledge_world as kw

    cfg = params.prepare.knowledge_world
    data = kw.generate(cfg, params.seed, answer_fn if cfg.probe.enabled else None, params.policy.model, prompt_key)
    probe = data.probe
    stats = {"probe": {
        "enabled": int(probe is not None),
        "n_facts": len(probe.known) if probe else len(data.world.real_facts()),
        "n_known": sum(probe.known.values()) if probe else 0,
        "known_rate": round(probe.known_rate, 4) if probe else 0.0,
    }, "world": {
        "entities": len(data.world.entities), "facts": len(data.world.facts),
        "countries": len(data.world.countries),
    }}
    return PreparedData(data.train, data.eval, list(data.world.passages), {"seen": data.seen}, stats=stats)


def _origin(path: str, line: int) -> str:
    return f"{path}, line {line}"


def _assemble(qa_files: Sequence[formats.QAFile], passage_files: Sequence[formats.PassageFile],
              corpus_from_contexts: bool, chunk_words: int, title_in_text: bool, corpus_key: str) -> PreparedData:
    """Records into splits (their `split` field), corpus files then context paragraphs into the corpus."""
    splits: dict[str, list[QARecord]] = {s: [] for s in QA_SPLITS}
    origins: dict[str, list[str]] = {s: [] for s in (*QA_SPLITS, "corpus")}
    corpus: list[Passage] = []
    for qf in qa_files:
        splits[qf.split].extend(qf.records)
        origins[qf.split].extend(_origin(qf.path, n) for n in qf.lines)
    for pf in passage_files:
        corpus.extend(pf.passages)
        origins["corpus"].extend(_origin(pf.path, n) for n in pf.lines)
    if corpus_from_contexts:
        for qf in qa_files:
            corpus.extend(qf.contexts)
            origins["corpus"].extend(_origin(qf.path, n) for n in qf.context_lines)
    if not corpus:
        listed = [pf.path for pf in passage_files]
        raise InputError("params.yaml", "the corpus is empty: no corpus files listed"
                         + (f" ({', '.join(listed)})" if listed else "")
                         + (" and no context paragraphs in the QA files" if corpus_from_contexts else ""),
                         field=corpus_key, fix="list passage files under corpus:, or QA files with contexts "
                                               "with corpus_from_contexts: true")
    if chunk_words:
        n_before = len(corpus)
        corpus, origins["corpus"] = _chunk_with_origins(corpus, origins["corpus"], chunk_words, title_in_text)
        log.info("chunking: %d passages -> %d chunks of <= %d words", n_before, len(corpus), chunk_words)
    stats = {"skipped_unanswerable": sum(qf.skipped for qf in qa_files)}
    return PreparedData(splits["train"], splits["eval"], corpus, {}, origins, stats)


def _chunk_with_origins(corpus: list[Passage], origins: list[str], n: int, title_in_text: bool):
    out, out_origins = [], []
    for p, o in zip(corpus, origins, strict=True):
        chunks = chunk_passage(p, n, title_in_text)
        out.extend(chunks)
        out_origins.extend([o] * len(chunks))
    return out, out_origins


def load_jsonl_source(cfg) -> PreparedData:
    """QA files (train / eval) and passage files (corpus) listed in a JsonlSourceCfg."""
    qa_files = []
    for split in QA_SPLITS:
        for spec in getattr(cfg, split):
            qf = formats.read_qa_file(resolve_input(spec.path), spec.format, spec.dataset, split, spec.limit)
            log.info("jsonl: %s (%s) -> %s: %d records, %d context paragraphs", spec.path, qf.format, split,
                     len(qf.records), len(qf.contexts))
            qa_files.append(qf)
    passage_files = [_read_corpus_spec(spec) for spec in cfg.corpus]
    return _assemble(qa_files, passage_files, cfg.corpus_from_contexts, cfg.chunk_words, cfg.title_in_text,
                     "prepare.jsonl.corpus")


def _read_corpus_spec(spec) -> formats.PassageFile:
    """A corpus entry: a passage file, or a QA file whose context paragraphs become passages."""
    path = resolve_input(spec.path)
    start = time.perf_counter()
    fmt = formats.detect_format(path) if spec.format == "auto" else spec.format
    if fmt == "passages":
        pf = formats.read_passage_file(path, spec.dataset, spec.limit)
    else:
        qf = formats.read_qa_file(path, fmt, spec.dataset, "eval", 0)
        contexts = qf.contexts[: spec.limit] if spec.limit else qf.contexts
        if not contexts:
            raise InputError(path, f"listed as corpus, but this {fmt} file has no context paragraphs",
                             fix="list a passage file instead")
        pf = formats.PassageFile(str(path), contexts, qf.context_lines[: len(contexts)])
    secs = time.perf_counter() - start
    log.info("corpus: %s: %d passages in %.1fs (%.0f passages/s)", spec.path, len(pf.passages), secs,
             len(pf.passages) / max(secs, 1e-9))
    return pf


def load_hf_source(cfg) -> PreparedData:
    from searchrl.data import hf

    qa_files = [hf.read_hf_dataset(spec) for spec in cfg.datasets]
    passage_files = [_read_corpus_spec(spec) for spec in cfg.corpus]
    return _assemble(qa_files, passage_files, cfg.corpus_from_contexts, cfg.chunk_words, cfg.title_in_text,
                     "prepare.hf.corpus")


# ----------------------------------------------------------------------------- common finish
def question_key(question: str) -> str:
    return normalize_answer(question)


def qa_key(r: QARecord) -> tuple:
    return question_key(r.question), tuple(sorted({normalize_answer(a) for a in r.answers}))


def passage_key(p: Passage) -> tuple:
    return " ".join(p.title.lower().split()), " ".join(p.text.lower().split())


def dedupe(items: list, origins: list[str] | None, key) -> tuple[list, list[str] | None, int]:
    """Keep the first of each key; returns (items, their origins, number removed)."""
    seen: set = set()
    keep = []
    for i, item in enumerate(items):
        k = key(item)
        if k not in seen:
            seen.add(k)
            keep.append(i)
    kept_origins = [origins[i] for i in keep] if origins else origins
    return [items[i] for i in keep], kept_origins, len(items) - len(keep)


def check_unique_ids(groups: dict[str, tuple[list, list[str] | None]], what: str) -> None:
    """Ids unique across all groups; a clash names both rows (file and line when known)."""
    first: dict[str, str] = {}
    for group, (items, origins) in groups.items():
        for i, item in enumerate(items):
            where = origins[i] if origins else f"{group} item {i + 1}"
            if item.id in first:
                raise InputError(where, f"duplicate {what} id {item.id!r}, also used by {first[item.id]}",
                                 field="id", fix="ids must be unique; rename one, or give the files distinct "
                                                 "dataset: names")
            first[item.id] = where


def contamination_report(train: list[QARecord], others: dict[str, list[QARecord]],
                         max_items: int = 200) -> dict:
    """Questions of each other split that also occur (normalised) in train."""
    train_ids: dict[str, list[str]] = {}
    for r in train:
        train_ids.setdefault(question_key(r.question), []).append(r.id)
    report = {}
    for name, records in others.items():
        hits = [{"id": r.id, "question": r.question, "train_ids": train_ids[question_key(r.question)][:5]}
                for r in records if question_key(r.question) in train_ids]
        report[name] = {"count": len(hits), "total": len(records),
                        "rate": round(len(hits) / len(records), 4) if records else 0.0, "items": hits[:max_items]}
    return report


def finalize(data: PreparedData) -> PreparedData:
    """De-duplicate records and passages, check id uniqueness, report contamination, fill stats."""
    removed: dict[str, int] = {}
    splits = data.splits()
    new_splits, new_origins = {}, {}
    for name, records in splits.items():
        kept, origins, n = dedupe(records, data.origins.get(name), qa_key)
        new_splits[name], new_origins[name], removed[name] = kept, origins, n
    corpus, corpus_origins, removed["corpus"] = dedupe(data.corpus, data.origins.get("corpus"), passage_key)
    for name, n in removed.items():
        if n:
            log.info("de-duplicated %s: removed %d duplicate %s", name, n,
                     "passages" if name == "corpus" else "records")
    check_unique_ids({name: (recs, new_origins[name]) for name, recs in new_splits.items()}, "QA record")
    check_unique_ids({"corpus": (corpus, corpus_origins)}, "passage")

    others = {k: v for k, v in new_splits.items() if k != "train"}
    contamination = contamination_report(new_splits["train"], others)
    if contamination.get("eval", {}).get("count"):
        log.warning("contamination: %d eval questions also occur in train (see contamination.json)",
                    contamination["eval"]["count"])
    out = PreparedData(new_splits["train"], new_splits["eval"], corpus,
                       {k: v for k, v in new_splits.items() if k not in QA_SPLITS},
                       {**new_origins, "corpus": corpus_origins}, dict(data.stats), contamination)
    out.stats = build_stats(out, removed)
    return out


def _split_stats(records: list[QARecord]) -> dict:
    out: dict = {"n": len(records), "dataset": dict(Counter(r.dataset for r in records))}
    qtypes = Counter(r.metadata["qtype"] for r in records if "qtype" in r.metadata)
    if qtypes:
        out["qtype"] = dict(qtypes)
    return out


def build_stats(data: PreparedData, removed: dict[str, int]) -> dict:
    """Numbers only (DVC metrics): counts per split / dataset / qtype, duplicates, contamination."""
    splits = data.splits()
    for name in EXTRA_SPLITS:
        splits.setdefault(name, [])
    stats = {name: _split_stats(recs) for name, recs in splits.items()}
    stats["corpus"] = {"n": len(data.corpus), "source": dict(Counter(p.source for p in data.corpus))}
    stats["duplicates_removed"] = {k: removed.get(k, 0) for k in (*splits, "corpus")}
    stats["contamination"] = {k: v["count"] for k, v in data.contamination.items()}
    stats.update(data.stats)
    return stats


def source_name(params: Params, split: str) -> str:
    """Where a split's records come from, in params terms (for error messages)."""
    cfg = params.prepare
    if cfg.source == "jsonl":
        specs = cfg.jsonl.corpus if split == "corpus" else getattr(cfg.jsonl, split)
        files = ", ".join(s.path for s in specs) or "no files listed"
        return f"prepare.jsonl.{split} ({files})"
    if cfg.source == "hf":
        if split == "corpus":
            return "prepare.hf (corpus files and context paragraphs)"
        names = ", ".join(f"{d.name}[{d.split}]" for d in cfg.hf.datasets if d.role == split) or "no datasets"
        return f"prepare.hf.datasets with role: {split} ({names})"
    return f"prepare.knowledge_world ({split})"


def check_splits(data: PreparedData, params: Params) -> None:
    """Fail at once on a split the pipeline needs but the source left empty, with one line naming the
    source: the eval split and the corpus always (evaluate and index read them), the train split
    when a trained model is evaluated (sft, rl, rl_<name>: the sample / sft / rl stages read it)."""
    from searchrl.evaluation import is_trained

    needed = [("eval", data.eval), ("corpus", data.corpus)]
    trained = [m for m in params.evaluate.methods if is_trained(m)]
    if trained:
        needed.insert(0, ("train", data.train))
    for split, items in needed:
        if not items:
            why = f" (evaluate.methods {', '.join(trained)} need a training set)" if split == "train" else ""
            raise InputError("params.yaml", f"{split} split is empty{why}", field=source_name(params, split),
                             fix="list a file with records for it" if split != "train" else
                             "list training files, or evaluate only direct / rag / agent_* methods")


def prepare_data(params: Params, answer_fn: AnswerFn | None = None, prompt_key: str = "") -> PreparedData:
    """Load, finalize and check the splits (`check_splits`) of `params.prepare.source`."""
    data = finalize(load_source(params, answer_fn, prompt_key))
    check_splits(data, params)
    return data


def write_outputs(data: PreparedData, out_dir: str | Path) -> dict[str, Path]:
    """Publish every file atomically; stats.json last (its presence means a complete set)."""
    out_dir = Path(out_dir)
    written = {}
    for name, (_, frame) in data.frames().items():
        path = out_dir / f"{name}.parquet"
        with atomic_path(path) as tmp:
            frame.to_parquet(tmp, index=False)
        written[name] = path
    write_json(out_dir / "contamination.json", data.contamination)
    write_json(out_dir / "stats.json", data.stats)
    written["contamination"], written["stats"] = out_dir / "contamination.json", out_dir / "stats.json"
    return written
