"""Tag protocols: how a policy asks for retrieval, how documents come back, where the answer goes.

A protocol is an adapter over the one rollout loop (searchrl/agent/engine.py). It owns the system
prompt, the stop strings, query extraction and cleaning, the exact text the environment inserts,
passage sanitising, answer extraction and the format validator the rewards call.

`r1searcher_pp` (R1-Searcher++, METHOD.md A.2 / A.5 / A.13; the paper's prompt is not public, ours
is written after A.13):
    <internal>recalled fact</internal>  <external>query</external>
    env: "\\n<document>\\n(1) Title: text\\n(2) ...\\n</document>\\n"      <answer>short</answer>
    Stops: "</external>", "</answer>". An empty query is not fatal: the environment inserts a short
    notice inside the document block (it still counts as an <external> call) and the model goes on.

`r1searcher` (R1-Searcher, METHOD.md B.2 / B.4 / B.6 / B.7 / B.8): the prompt ends with "<think>";
    <|begin_of_query|> keywords <|end_of_query|>
    env: "\\n\\n<|begin_of_documents|>\\n(1)Title: ... Text: ...\\n(2)...\\n<|end_of_documents|>\\n\\n"
    one "</think>", then <answer>short</answer>. Stops: "<|end_of_query|>", "</answer>".
    An empty query ends the rollout as malformed (B.8 `query_inst_error`); no hits inserts "None".
    Difference from the reference code: there the stop string is cut from the sampled text and the
    environment re-appends "<|end_of_query|>\\n\\n" (unmasked); here the stop string stays in the
    model's own tokens and the environment block is exactly "\\n\\n<|begin_of_documents|>...\\n\\n",
    all of it masked.

Env text is always built from a fixed frame plus sanitised passages (`sanitize_passage`): every tag
of BOTH protocols (and near-variants: case, inner spaces, `< /document >`, `<|end_of_documents|>`
without bars), chat special tokens (`<|im_end|>`, ...) and every added token of the tokenizer
(`backends.added_tokens`: SmolLM2's `<file_sep>`, `<filename>`, ... as well) are removed from passage
text, so retrieved text can never close the block, forge a query or an answer, or inject a special
token id; the engine also encodes the block with `backends.encode_untrusted(allow=protocol.tags)`.
Each passage shows at most `max_passage_words` words, title included.

Queries are cleaned per protocol (`clean_query`): R1-Searcher as its evaluation code does (B.8:
quotes deleted, tabs to spaces, "..." deleted), R1-Searcher++ with our own whitespace-collapsing
cleaning. Answers are extracted raw (surrounding spaces kept), as R1-Searcher scores them.

`validate(traj_or_text)` returns a list of format violations ("code: detail"), empty when the format
is correct. Given a Trajectory it knows exactly which segments the environment inserted; given only
text it recovers the env blocks from the frame (a block directly after a query's closing tag).
"""

from __future__ import annotations

import abc
import re
from dataclasses import dataclass

from searchrl.agent.trajectory import Trajectory
from searchrl.data.schema import passage_body

# ----------------------------------------------------------------------------- sanitising
_TAG_NAMES = ("internal", "external", "document", "documents", "answer", "think", "in", "ex", "doc",
              "search", "information", "result", "results", "query", "tool_call", "tool_response")
_HTML_TAG_RE = re.compile(r"<\s*/?\s*(?:" + "|".join(_TAG_NAMES) + r")\b[^<>]{0,40}?/?\s*>", re.IGNORECASE)
_BAR_TAG_RE = re.compile(r"<\s*\|[^<>|]{0,60}\|\s*>")  # <|begin_of_query|>, <|im_end|>, <|endoftext|>, ...
_QDOC_RE = re.compile(r"<?\s*\|?\s*(?:begin|end)[\s_-]*of[\s_-]*(?:query|queries|documents?)\s*\|?\s*>?",
                      re.IGNORECASE)
_WS_RE = re.compile(r"[ \t]{2,}")
CJK_RE = re.compile(r"[\u4e00-\u9fff]")


def sanitize_passage(text: str, extra_tokens: tuple[str, ...] | list[str] = ()) -> str:
    """Remove every protocol tag of both protocols (and near-variants) and every string of
    `extra_tokens` (pass `backends.added_tokens(tokenizer)`: all of the tokenizer's added tokens, not
    only `all_special_tokens`) from retrieved text; whitespace is normalised to single spaces (a
    passage is one line)."""
    extra = [t for t in extra_tokens if t and len(t) > 1]
    prev = None
    while prev != text:  # removing one tag may join the halves of another ("<ans<answer>wer>")
        prev = text
        for tok in extra:
            text = text.replace(tok, " ")
        text = _BAR_TAG_RE.sub(" ", text)
        text = _QDOC_RE.sub(" ", text)
        text = _HTML_TAG_RE.sub(" ", text)
    text = " ".join(text.split())
    return text


def truncate_words(text: str, max_words: int) -> str:
    words = text.split()
    return text if len(words) <= max_words else " ".join(words[:max_words]) + " ..."


def passage_view(title: str, text: str, max_words: int, extra_tokens=()) -> tuple[str, str]:
    """(title, text) of one retrieved passage as a model sees it: sanitised, and at most `max_words`
    words of title and text together (a longer text ends with " ..."). A title that would fill the
    whole cap (a corpus row whose title is its text) is dropped, and so is a title equal to the text:
    the model sees each word once."""
    shown_title = sanitize_passage(title, extra_tokens)
    body = sanitize_passage(passage_body(title, text), extra_tokens)
    n_title = len(shown_title.split())
    if n_title >= max_words or shown_title == body:
        shown_title, n_title = "", 0
    return shown_title, truncate_words(body, max_words - n_title)


QUERY_CLEANING = ("collapse", "r1searcher_eval", "r1searcher_train")


def clean_query(q: str, max_chars: int = 300, style: str = "collapse") -> str:
    """The query text sent to the retriever, then capped at max_chars (cut at a word boundary).

    collapse          (ours, R1-Searcher++: its code is not public) quotes and tabs become spaces,
                      "..." is removed, whitespace collapsed: "Shah's" -> "Shah s".
    r1searcher_eval   R1-Searcher's evaluation (METHOD.md B.8, `eval_search_loacl.py`):
                      `q.replace('"', "").replace("'", "").replace("\\t", " ").replace("...", "").strip()`;
                      quotes are deleted ("Shah's" -> "Shahs"), inner whitespace is kept.
    r1searcher_train  R1-Searcher's training rollouts (METHOD.md B.6, `experience_maker.py`):
                      `" ".join(q.replace('"', "").strip().split())`; apostrophes and "..." are kept.
    """
    if style == "r1searcher_eval":
        q = q.replace('"', "").replace("'", "").replace("\t", " ").replace("...", "").strip()
    elif style == "r1searcher_train":
        q = " ".join(q.replace('"', "").split())
    elif style == "collapse":
        q = " ".join(q.replace('"', " ").replace("'", " ").replace("\t", " ").replace("...", " ").split())
    else:
        raise ValueError(f"query cleaning '{style}': expected one of {', '.join(QUERY_CLEANING)}")
    if len(q) > max_chars:
        cut = q[:max_chars]
        q = cut.rsplit(" ", 1)[0] if " " in cut else cut
    return q


def word_count(s: str) -> int:
    return len(s.split())


# ----------------------------------------------------------------------------- base
@dataclass
class Action:
    kind: str  # "search" | "answer" | "end" (EOS / length without a known action) | "bad_query"
    query: str | None = None
    detail: str = ""


class Protocol(abc.ABC):
    """One tag protocol over the shared rollout loop; subclasses fill in the abstract methods."""

    name: str = ""
    query_open: str = ""
    query_close: str = ""
    answer_open = "<answer>"
    answer_close = "</answer>"
    assistant_prefix: str = ""
    empty_query_fatal: bool = False
    query_cleaning: str = "collapse"  # clean_query style
    extra_tags: tuple[str, ...] = ()  # the protocol's other tags (think / internal)

    def __init__(self, max_query_chars: int = 300, max_passage_words: int = 120, max_answer_words: int = 10,
                 query_cleaning: str | None = None):
        self.max_query_chars = max_query_chars
        self.max_passage_words = max_passage_words
        self.max_answer_words = max_answer_words
        if query_cleaning is not None:
            if query_cleaning not in QUERY_CLEANING:
                raise ValueError(f"query cleaning '{query_cleaning}': expected one of {', '.join(QUERY_CLEANING)}")
            self.query_cleaning = query_cleaning

    @property
    def tags(self) -> tuple[str, ...]:
        """Every tag string of the protocol: the trusted frame a tokenizer may parse as added tokens
        (`backends.encode_untrusted(..., allow=protocol.tags)`)."""
        return (self.query_open, self.query_close, self.answer_open, self.answer_close,
                getattr(self, "doc_open", ""), getattr(self, "doc_close", ""), *self.extra_tags)

    def clean_query(self, raw: str) -> str:
        return clean_query(raw, self.max_query_chars, self.query_cleaning)

    # -- prompting
    @property
    def stops(self) -> list[str]:
        return [self.query_close, self.answer_close]

    @abc.abstractmethod
    def system_prompt(self) -> str:
        ...

    def user_message(self, question: str) -> str:
        return question.strip()

    def prompt_ids(self, tokenizer, question: str) -> tuple[str, list[int]]:
        from searchrl.agent.backends import chat_prompt_ids, decode

        ids = chat_prompt_ids(tokenizer, self.system_prompt(), self.user_message(question), self.assistant_prefix)
        return decode(tokenizer, ids), ids

    # -- reading the model's segment
    def parse_segment(self, text: str, stop: str | None, lead: str = "") -> Action:
        """What the model asked for in the segment it just finished (`stop` is the stop string matched;
        `lead` is prompt text the segment continues, i.e. the assistant prefix for the first segment,
        so a prefix that opens a query, e.g. "<external>", works)."""
        if stop == self.answer_close:
            return Action("answer")
        if stop == self.query_close:
            text = lead + text
            cut = text.rfind(self.query_close)
            head = text[:cut]
            op = head.rfind(self.query_open)
            if op < 0:
                return Action("bad_query", None, f"{self.query_close} without {self.query_open}")
            raw = head[op + len(self.query_open):]
            return Action("search", self.clean_query(raw))
        return Action("end")

    def extract_answer(self, model_text: str) -> str | None:
        """Raw text of the last complete <answer>...</answer>, surrounding spaces kept, or None.

        Not stripped: R1-Searcher's `pred_ans` keeps them and the metrics map only the exact strings
        "True" / "False" to yes / no (METHOD.md B.8, C), so " False " is scored as the word "false"."""
        end = model_text.rfind(self.answer_close)
        if end < 0:
            return None
        start = model_text.rfind(self.answer_open, 0, end)
        if start < 0:
            return None
        return model_text[start + len(self.answer_open): end]

    # -- what the environment inserts
    @abc.abstractmethod
    def format_passage(self, i: int, title: str, text: str) -> str:
        ...

    @abc.abstractmethod
    def documents_text(self, hits, extra_tokens=()) -> str:
        ...

    @abc.abstractmethod
    def empty_query_text(self) -> str:
        ...

    def _passage_line(self, i: int, hit, extra_tokens) -> str:
        title, body = passage_view(getattr(hit, "title", "") or "", hit.text, self.max_passage_words, extra_tokens)
        return self.format_passage(i, title, body)

    # -- format checks
    @abc.abstractmethod
    def env_spans(self, text: str) -> list[tuple[int, int]]:
        """Character spans of environment blocks recovered from text alone."""

    def _frame_spans(self, text: str, frame_open: str, frame_close: str) -> list[tuple[int, int]]:
        """Env blocks = `frame_open ... frame_close` starting within a few characters after a query's
        closing tag (the model's last token may run a little past the stop string)."""
        spans, pos = [], 0
        while True:
            j = text.find(self.query_close, pos)
            if j < 0:
                return spans
            j += len(self.query_close)
            k = text.find(frame_open, j)
            if k < 0 or k - j > 8:
                pos = j
                continue
            e = text.find(frame_close, k + len(frame_open))
            if e < 0:
                return spans
            spans.append((k, e + len(frame_close)))
            pos = e + len(frame_close)

    def split_text(self, text: str) -> list[tuple[str, str]]:
        """[(role, text)] from a rendered completion (text-only validation)."""
        out, pos = [], 0
        for a, b in self.env_spans(text):
            if a > pos:
                out.append(("model", text[pos:a]))
            out.append(("env", text[a:b]))
            pos = b
        if pos < len(text):
            out.append(("model", text[pos:]))
        return out

    def validate(self, traj: Trajectory | str) -> list[str]:
        if isinstance(traj, Trajectory):
            parts = [(s.role, s.text) for s in traj.segments]
        else:
            parts = self.split_text(traj)
        return self._validate(parts)

    @abc.abstractmethod
    def _validate(self, parts: list[tuple[str, str]]) -> list[str]:
        ...

    @staticmethod
    def _garbled(model_text: str) -> list[str]:
        errs = []
        if "\ufffd" in model_text:
            errs.append("garbled: undecodable bytes in the model's text")
        if CJK_RE.search(model_text):
            errs.append("garbled: CJK characters outside documents")
        if _BAR_TAG_RE.search(model_text.replace("<|begin_of_query|>", "").replace("<|end_of_query|>", "")
                              .replace("<|begin_of_documents|>", "").replace("<|end_of_documents|>", "")):
            errs.append("garbled: special token text (<|...|>) in the model's text")
        return errs


# ----------------------------------------------------------------------------- R1-Searcher++
PP_SYSTEM = """You answer questions by reasoning step by step. You can draw on two sources of knowledge: your own memory and a search engine over a document collection.
- For a fact you are sure of, state it inside <internal> and </internal>, for example <internal>Paris is the capital of France.</internal>
- For a fact you are not sure of, write a short keyword query inside <external> and </external>, for example <external>birthplace of Ada Lovelace</external>. Search for one fact at a time. The system then returns passages inside <document> and </document>; never write <document> yourself.
- Use your own knowledge when you can, and search only for what you do not know.
- Finish with the final answer inside <answer> and </answer>. The answer must be short: a name, a date, a number or a few words, not a sentence."""


class R1SearcherPP(Protocol):
    name = "r1searcher_pp"
    query_open, query_close = "<external>", "</external>"
    internal_open, internal_close = "<internal>", "</internal>"
    doc_open, doc_close = "<document>", "</document>"
    empty_query_fatal = False
    extra_tags = ("<internal>", "</internal>")

    def system_prompt(self) -> str:
        return PP_SYSTEM

    def format_passage(self, i: int, title: str, text: str) -> str:
        return f"({i}) {title}: {text}" if title else f"({i}) {text}"

    def documents_text(self, hits, extra_tokens=()) -> str:
        lines = [self._passage_line(i, h, extra_tokens) for i, h in enumerate(hits, 1)] or ["(no results)"]
        return "\n" + self.doc_open + "\n" + "\n".join(lines) + "\n" + self.doc_close + "\n"

    def empty_query_text(self) -> str:
        return "\n" + self.doc_open + "\n(empty query: nothing was searched)\n" + self.doc_close + "\n"

    def env_spans(self, text: str) -> list[tuple[int, int]]:
        return self._frame_spans(text, "\n" + self.doc_open + "\n", self.doc_close + "\n")

    def internal_steps(self, model_text: str) -> int:
        return len(re.findall(re.escape(self.internal_open) + r"(.*?)" + re.escape(self.internal_close),
                              model_text, flags=re.DOTALL))

    def _validate(self, parts):
        errs: list[str] = []
        model_text = "".join(t for r, t in parts if r == "model")
        # self-written documents: any document tag in a model segment
        for r, t in parts:
            if r == "model" and (self.doc_open in t or self.doc_close in t):
                errs.append("document written by the model (no retrieval call produced it)")
                break
        # queries
        n_open, n_close = model_text.count(self.query_open), model_text.count(self.query_close)
        if n_open != n_close:
            errs.append(f"query tags unbalanced: {n_open} {self.query_open} vs {n_close} {self.query_close}")
        for q in re.findall(re.escape(self.query_open) + r"(.*?)" + re.escape(self.query_close), model_text,
                            flags=re.DOTALL):
            if self.query_open in q:
                errs.append("query tags nested")
            elif not self.clean_query(q):
                errs.append("empty query")
        env_after_query = sum(1 for r, _ in parts if r == "env")
        if env_after_query > n_close:
            errs.append("more document blocks than queries")
        # internal
        i_open, i_close = model_text.count(self.internal_open), model_text.count(self.internal_close)
        if i_open != i_close:
            errs.append(f"internal tags unbalanced: {i_open} vs {i_close}")
        # answer
        a_open, a_close = model_text.count(self.answer_open), model_text.count(self.answer_close)
        if a_open == 0 or a_close == 0:
            errs.append("answer missing")
        elif a_open != 1 or a_close != 1:
            errs.append(f"answer tags: {a_open} {self.answer_open} / {a_close} {self.answer_close} (need one each)")
        else:
            s, e = model_text.find(self.answer_open), model_text.find(self.answer_close)
            ans = model_text[s + len(self.answer_open): e]
            if e < s:
                errs.append("answer tags out of order")
            elif not ans.strip():
                errs.append("answer empty")
            elif re.search(r"<\s*/?\s*(internal|external|document|answer)\b", ans, re.IGNORECASE):
                errs.append("tags inside the answer")
            last_model = next((t for r, t in reversed(parts) if r == "model"), "")
            if self.answer_close not in last_model:
                errs.append("answer is not at the end (the environment or the model continued after it)")
            tail = model_text[e + len(self.answer_close):]
            if re.search(r"<\s*/?\s*(internal|external|document|answer)\b", tail, re.IGNORECASE):
                errs.append("actions after the answer")
        errs.extend(self._garbled(model_text))
        return errs


# ----------------------------------------------------------------------------- R1-Searcher
R1_SYSTEM = """You are a helpful assistant. Given a question, first reason about it step by step inside <think> and </think>, then give the final answer inside <answer> and </answer>.
While reasoning you may look up facts you are unsure of. To search, write <|begin_of_query|> keywords <|end_of_query|>. A query must ask about a single fact (one subject, relation and object) and contain only keywords, not a full sentence. The system then returns passages in the form <|begin_of_documents|> ... <|end_of_documents|>. You may search as many times as you need.
The answer inside <answer> and </answer> must be short: a name, a date, a number or a few words."""

_R1_SEVEN = ("<|begin_of_documents|>\n", "<|end_of_documents|>\n\n", "<|begin_of_query|>", "<|end_of_query|>",
             "<|begin_of_documents|>", "<|end_of_documents|>", "<|begin_of_documents|>\n(1)")


class R1Searcher(Protocol):
    name = "r1searcher"
    query_open, query_close = "<|begin_of_query|>", "<|end_of_query|>"
    doc_open, doc_close = "<|begin_of_documents|>", "<|end_of_documents|>"
    assistant_prefix = "<think>"
    empty_query_fatal = True
    # R1-Searcher's evaluation cleaning (B.8); its training rollouts used B.6's ("r1searcher_train")
    query_cleaning = "r1searcher_eval"
    extra_tags = ("<think>", "</think>")

    def system_prompt(self) -> str:
        return R1_SYSTEM

    def format_passage(self, i: int, title: str, text: str) -> str:
        return f"({i})Title: {title} Text: {text}" if title else f"({i}){text}"

    def documents_text(self, hits, extra_tokens=()) -> str:
        lines = [self._passage_line(i, h, extra_tokens) for i, h in enumerate(hits, 1)] or ["None"]
        return "\n\n" + self.doc_open + "\n" + "\n".join(lines) + "\n" + self.doc_close + "\n\n"

    def empty_query_text(self) -> str:  # not used: an empty query is fatal here
        return "\n\n" + self.doc_open + "\nNone\n" + self.doc_close + "\n\n"

    def internal_steps(self, model_text: str) -> int:
        return 0

    def env_spans(self, text: str) -> list[tuple[int, int]]:
        return self._frame_spans(text, "\n\n" + self.doc_open + "\n", self.doc_close + "\n\n")

    def _validate(self, parts):
        """B.4 Qwen reward-server checks. The seven tag counts are taken over the whole solution
        (model + environment text, as the server does); "Assistant" and CJK are checked on the
        model's text only (a retrieved passage may legitimately contain either)."""
        errs: list[str] = []
        full = "".join(t for _, t in parts)
        model_text = "".join(t for r, t in parts if r == "model")
        counts = [full.count(t) for t in _R1_SEVEN]
        if len(set(counts)) != 1:
            errs.append("tag counts unequal: " + ", ".join(f"{t!r}={c}" for t, c in zip(_R1_SEVEN, counts,
                                                                                            strict=True)))
        for r, t in parts:
            if r == "model" and (self.doc_open in t or self.doc_close in t):
                errs.append("documents written by the model (no retrieval call produced them)")
                break
        if "Assistant" in model_text or "assistant" in model_text:
            errs.append("'Assistant' in the model's text")
        if model_text.count("<think>") != 0 or model_text.count("</think>") != 1:
            errs.append(f"think tags: {model_text.count('<think>')} <think> (need 0), "
                        f"{model_text.count('</think>')} </think> (need 1)")
        a_open, a_close = model_text.count(self.answer_open), model_text.count(self.answer_close)
        if a_open != 1 or a_close != 1:
            errs.append("answer missing" if a_open == 0 or a_close == 0 else
                        f"answer tags: {a_open} <answer> / {a_close} </answer> (need one each)")
        else:
            ans = self.extract_answer(model_text) or ""
            if "begin_of_query" in ans or "begin_of_documents" in ans:
                errs.append("tags inside the answer")
            if word_count(ans) > self.max_answer_words:
                errs.append(f"answer longer than {self.max_answer_words} words ({word_count(ans)})")
        if CJK_RE.search(model_text):
            errs.append("garbled: CJK characters outside documents")
        if "\ufffd" in model_text:
            errs.append("garbled: undecodable bytes in the model's text")
        return errs


PROTOCOLS = {"r1searcher_pp": R1SearcherPP, "r1searcher": R1Searcher}


def get_protocol(name: str, agent_cfg=None, **kw) -> Protocol:
    """Protocol by name; caps (query chars, passage words) from agent_cfg when given."""
    if name not in PROTOCOLS:
        raise ValueError(f"agent.protocol: unknown protocol '{name}' (known: {', '.join(PROTOCOLS)})")
    if agent_cfg is not None:
        kw.setdefault("max_query_chars", agent_cfg.max_query_chars)
        kw.setdefault("max_passage_words", agent_cfg.max_passage_words)
    return PROTOCOLS[name](**kw)
