"""What every tag protocol shares: passage sanitising, query cleaning, the `Protocol` base class.

A protocol is an adapter over the one rollout loop (searchrl/agent/engine.py). It owns the prompt,
the stop strings, query extraction and cleaning, the exact text the environment inserts, passage
sanitising, answer extraction and the format validator the rewards call. The protocols themselves
are in the sibling modules (see the package docstring for the table).

Env text is always built from a fixed frame plus sanitised passages (`sanitize_passage`): every tag
of EVERY protocol (and near-variants: case, inner spaces, `< /document >`, `<|end_of_documents|>`
without bars), chat special tokens (`<|im_end|>`, ...) and every added token of the tokenizer
(`backends.added_tokens`: SmolLM2's `<file_sep>`, `<filename>`, ... as well) are removed from passage
text, so retrieved text can never close the block, forge a query, a tool call or an answer, or
inject a special token id; the engine also encodes the block with
`backends.encode_untrusted(allow=protocol.tags)`. Each passage shows at most `max_passage_words`
words, title included.
"""

from __future__ import annotations

import abc
import re
from dataclasses import dataclass

from searchrl.agent.trajectory import Trajectory
from searchrl.data.schema import passage_body

# ----------------------------------------------------------------------------- sanitising
# the tag names of every protocol (r1searcher_pp, r1searcher, search_r1, tool_call) and their figures' short forms
_TAG_NAMES = ("internal", "external", "document", "documents", "answer", "think", "in", "ex", "doc",
              "search", "information", "result", "results", "query", "tool_call", "tool_response")
_HTML_TAG_RE = re.compile(r"<\s*/?\s*(?:" + "|".join(_TAG_NAMES) + r")\b[^<>]{0,40}?/?\s*>", re.IGNORECASE)
_BAR_TAG_RE = re.compile(r"<\s*\|[^<>|]{0,60}\|\s*>")  # <|begin_of_query|>, <|im_end|>, <|endoftext|>, ...
_QDOC_RE = re.compile(r"<?\s*\|?\s*(?:begin|end)[\s_-]*of[\s_-]*(?:query|queries|documents?)\s*\|?\s*>?",
                      re.IGNORECASE)
CJK_RE = re.compile(r"[\u4e00-\u9fff]")
_R1_TAG_TEXT = ("<|begin_of_query|>", "<|end_of_query|>", "<|begin_of_documents|>", "<|end_of_documents|>")


def sanitize_passage(text: str, extra_tokens: tuple[str, ...] | list[str] = ()) -> str:
    """Remove every protocol tag of every protocol (and near-variants) and every string of
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


CHARS_PER_WORD = 8  # a passage's character bound per word of its cap (English averages ~6 with the space)


_SENTENCE_TOKEN_RE = re.compile(r"</?s>|\[/?INST\]|<<\s*/?SYS\s*>>")  # Llama-2 / Mistral control text


def strip_control_text(text: str) -> str:
    """Untrusted text bound for a model whose tokenizer we do not hold (an HTTP judge or summariser):
    remove what chat templates parse as control tokens there (`<|im_end|>`, `<|eot_id|>` and every other
    `<|...|>`, `<s>`/`</s>`, `[INST]`, `<<SYS>>`), repeatedly, so removing one cannot join another."""
    prev = None
    while prev != text:
        prev = text
        text = _SENTENCE_TOKEN_RE.sub(" ", _BAR_TAG_RE.sub(" ", text))
    return text


def truncate_words(text: str, max_words: int) -> str:
    """At most `max_words` words and `CHARS_PER_WORD * max_words` characters (a longer text ends with
    " ..."). The character bound is what keeps a passage's tokens bounded when its "words" are not
    words (one 15,000-character run without spaces, a table without spaces): a BPE token covers at least
    one character, so a passage is at most ~8 x max_words tokens whatever its text."""
    words = text.split()
    cut = text if len(words) <= max_words else " ".join(words[:max_words]) + " ..."
    max_chars = CHARS_PER_WORD * max_words
    if len(cut) <= max_chars + 4:  # + the " ..." of a word cut
        return cut
    return cut[:max_chars].rstrip() + " ..."


def passage_view(title: str, text: str, max_words: int, extra_tokens=()) -> tuple[str, str]:
    """(title, text) of one retrieved passage as a model sees it: sanitised, and at most `max_words`
    words of title and text together (a longer text ends with " ..."; `truncate_words` also bounds the
    characters, and a title longer than the cap's characters is dropped like one of too many words). A title that would fill the
    whole cap (a corpus row whose title is its text) is dropped, and so is a title equal to the text:
    the model sees each word once."""
    shown_title = sanitize_passage(title, extra_tokens)
    body = sanitize_passage(passage_body(title, text), extra_tokens)
    n_title = len(shown_title.split())
    if n_title >= max_words or len(shown_title) > CHARS_PER_WORD * max_words // 2 or shown_title == body:
        shown_title, n_title = "", 0
    return shown_title, truncate_words(body, max_words - n_title)


QUERY_CLEANING = ("collapse", "r1searcher_eval", "r1searcher_train", "strip")


def clean_query(q: str, max_chars: int = 300, style: str = "collapse") -> str:
    """The query text sent to the retriever, then capped at max_chars (cut at a word boundary).

    collapse          (ours: R1-Searcher++, tool_call) quotes and tabs become spaces, "..." is
                      removed, whitespace collapsed: "Shah's" -> "Shah s".
    r1searcher_eval   R1-Searcher's evaluation (METHOD.md B.8, `eval_search_loacl.py`):
                      `q.replace('"', "").replace("'", "").replace("\\t", " ").replace("...", "").strip()`;
                      quotes are deleted ("Shah's" -> "Shahs"), inner whitespace is kept.
    r1searcher_train  R1-Searcher's training rollouts (METHOD.md B.6, `experience_maker.py`):
                      `" ".join(q.replace('"', "").strip().split())`; apostrophes and "..." are kept.
    strip             Search-R1 (`generation.py` `postprocess_predictions`): `q.strip()` only.
    """
    if style == "r1searcher_eval":
        q = q.replace('"', "").replace("'", "").replace("\t", " ").replace("...", "").strip()
    elif style == "r1searcher_train":
        q = " ".join(q.replace('"', "").split())
    elif style == "collapse":
        q = " ".join(q.replace('"', " ").replace("'", " ").replace("\t", " ").replace("...", " ").split())
    elif style == "strip":
        q = q.strip()
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
    """One tag protocol over the shared rollout loop; subclasses fill in the abstract methods.

    `prompt_style` picks the prompt layout among `prompt_styles` (the first is the default): "ours"
    (our own wording) or a released model's own layout (see each protocol)."""

    name: str = ""
    query_open: str = ""
    query_close: str = ""
    doc_open: str = ""
    doc_close: str = ""
    answer_open = "<answer>"
    answer_close = "</answer>"
    assistant_prefix: str = ""
    empty_query_fatal: bool = False
    query_cleaning: str = "collapse"  # clean_query style
    extra_tags: tuple[str, ...] = ()  # the protocol's other tags (think / internal)
    prompt_styles: tuple[str, ...] = ("ours",)
    answer_lead: str = ""  # what a scripted (oracle) answer segment writes before the answer tags

    def __init__(self, max_query_chars: int = 300, max_passage_words: int = 120, max_answer_words: int = 10,
                 query_cleaning: str | None = None, prompt_style: str | None = None):
        self.max_query_chars = max_query_chars
        self.max_passage_words = max_passage_words
        self.max_answer_words = max_answer_words
        if query_cleaning is not None:
            if query_cleaning not in QUERY_CLEANING:
                raise ValueError(f"query cleaning '{query_cleaning}': expected one of {', '.join(QUERY_CLEANING)}")
            self.query_cleaning = query_cleaning
        if prompt_style is not None and prompt_style not in self.prompt_styles:
            raise ValueError(f"agent.prompt_style: protocol {self.name} has no prompt style '{prompt_style}' "
                             f"(it has {', '.join(self.prompt_styles)})")
        self.prompt_style = prompt_style or self.prompt_styles[0]

    @property
    def tags(self) -> tuple[str, ...]:
        """Every tag string of the protocol: the trusted frame a tokenizer may parse as added tokens
        (`backends.encode_untrusted(..., allow=protocol.tags)`)."""
        return tuple(t for t in (self.query_open, self.query_close, self.answer_open, self.answer_close,
                                 self.doc_open, self.doc_close, *self.extra_tags) if t)

    def validation_tags(self) -> dict:
        """Options of the trajectory data suite (searchrl/validation/suites.py `sft_suite`): every
        (open, close) pair that must balance in a trajectory's text, and which pair is the query
        and which the documents."""
        return {"tags": {"query": (self.query_open, self.query_close), "documents": (self.doc_open, self.doc_close),
                         "answer": (self.answer_open, self.answer_close)},
                "query_tag": "query", "document_tag": "documents"}

    def clean_query(self, raw: str) -> str:
        return clean_query(raw, self.max_query_chars, self.query_cleaning)

    def bind(self, tokenizer) -> None:
        """Adapt to the tokenizer the rollouts use (the tool_call protocol reads its chat template);
        `prompt_ids` calls it. Nothing to do for a tag protocol."""
        return None

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
            raw = self.query_body(lead + text)
            if raw is None:
                return Action("bad_query", None, f"{self.query_close} without {self.query_open}")
            return self.query_action(raw)
        return Action("end")

    def query_body(self, text: str) -> str | None:
        """The raw text between the last query open tag and the query close tag that ends `text`
        (the last token may run a little past it), or None without an open tag."""
        cut = text.rfind(self.query_close)
        head = text[:cut]
        op = head.rfind(self.query_open)
        return None if op < 0 else head[op + len(self.query_open):]

    def query_action(self, raw: str) -> Action:
        """The action for the raw query text (a tag protocol: the cleaned text is the query)."""
        return Action("search", self.clean_query(raw))

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

    def internal_steps(self, model_text: str) -> int:
        """Facts recalled from the model's own memory (R1-Searcher++'s <internal> steps); 0 elsewhere."""
        return 0

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
        """Format violations ("code: detail"), empty when the format is correct. Given a Trajectory it
        knows exactly which segments the environment inserted; given only text it recovers the env
        blocks from the frame (a block directly after a query's closing tag)."""
        if isinstance(traj, Trajectory):
            parts = [(s.role, s.text) for s in traj.segments]
        else:
            parts = self.split_text(traj)
        return self._validate(parts)

    @abc.abstractmethod
    def _validate(self, parts: list[tuple[str, str]]) -> list[str]:
        ...

    def _self_written_documents(self, parts) -> list[str]:
        for r, t in parts:
            if r == "model" and (self.doc_open in t or self.doc_close in t):
                return ["document written by the model (no retrieval call produced it)"]
        return []

    @staticmethod
    def _garbled(model_text: str) -> list[str]:
        errs = []
        if "\ufffd" in model_text:
            errs.append("garbled: undecodable bytes in the model's text")
        if CJK_RE.search(model_text):
            errs.append("garbled: CJK characters outside documents")
        stripped = model_text
        for tag in _R1_TAG_TEXT:
            stripped = stripped.replace(tag, "")
        if _BAR_TAG_RE.search(stripped):
            errs.append("garbled: special token text (<|...|>) in the model's text")
        return errs
