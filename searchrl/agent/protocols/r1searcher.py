"""The R1-Searcher++ and R1-Searcher tag protocols.

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

    Prompt styles (`agent.prompt_style`), so released R1-Searcher checkpoints are prompted as their
    authors prompted them (B.7):
      ours            our own system prompt (R1_SYSTEM) in the tokenizer's chat template, then "<think>".
      reference_base  the reference evaluation's plain-text Base-model prompt (`eval_search_loacl.py`
                      prompt v0, the one its README runs): "The User asks a question, ... User:{question}
                      \\nAssistant: <think>", no chat template (BOS first where the tokenizer adds one,
                      as vLLM does for a text prompt). For Qwen-2.5-7B-base-RAG-RL.
      reference_chat  the reference Instruct-model system prompt (`prompts_dataset.py`, the online
                      evaluation's v3) in the tokenizer's chat template, the question as the user turn,
                      then "<think>". For Llama-3.1-8B-instruct-RAG-RL.
      reference       reference_chat when the tokenizer has a chat template, else reference_base. (A
                      Base model's tokenizer often carries a chat template too: name reference_base.)
    The reference strings were read from public copies of the repository's files (the FlashRAG port of
    the evaluation prompt, and copies of `prompts_dataset.py` / `eval_search_online.py`), which agree
    with each other and with METHOD.md B.7.

Queries are cleaned per protocol (`clean_query`): R1-Searcher as its evaluation code does (B.8:
quotes deleted, tabs to spaces, "..." deleted), R1-Searcher++ with our own whitespace-collapsing
cleaning. Answers are extracted raw (surrounding spaces kept), as R1-Searcher scores them.
"""

from __future__ import annotations

import re

from searchrl.agent.protocols.base import CJK_RE, Protocol, word_count

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

    def validation_tags(self) -> dict:
        return {"tags": {"internal": (self.internal_open, self.internal_close),
                         "external": (self.query_open, self.query_close),
                         "document": (self.doc_open, self.doc_close),
                         "answer": (self.answer_open, self.answer_close)},
                "query_tag": "external", "document_tag": "document"}

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

# The reference repository's own prompts (METHOD.md B.7; see the module docstring for where they were read).
R1_REFERENCE_BASE = (
    "The User asks a question, and the Assistant solves it.\n"
    "The Assistant first thinks about the reasoning process in the mind and then provides the User with the final "
    "answer.\n"
    "The output format of reasoning process and final answer are enclosed within <think> </think> and <answer> "
    "</answer> tags, respectively, i.e., \"<think> reasoning process here </think>\n\n<answer> final answer here "
    "</answer>\".\n"
    "During the thinking process, the Assistant can perform searching for uncertain knowledge if necessary with "
    "the format of \"<|begin_of_query|> search query (only keywords) here <|end_of_query|>\". **A query must "
    "involve only a single triple**.\n"
    "Then, the system will provide the Assistant with helpful information with the format of "
    "\"<|begin_of_documents|> ...search results... <|end_of_documents|>\".\n\n"
    "User:{question}\n"
    "Assistant: <think>")
R1_REFERENCE_SYSTEM = (
    "You are a helpful assistant.\n"
    "Given a question, you should answer it by first thinking about the reasoning process in the mind and then "
    "providing the final answer.\n"
    "The output format of reasoning process and final answer are enclosed within <think> </think> and <answer> "
    "</answer> tags, respectively, i.e., \"<think> reasoning process here </think>\n\n<answer> final answer here "
    "</answer>\".\n"
    "During the thinking process, **you can perform searching for uncertain knowledge** if necessary with the "
    "format of \"<|begin_of_query|> search query (only list keywords, such as **\"keyword_1 keyword_2 ...\"**)"
    "<|end_of_query|>\". **A query must involve only a single triple**.\n"
    "Then, the search system will provide you with the retrieval information with the format of "
    "\"<|begin_of_documents|> ...search results... <|end_of_documents|>\".")
_QUESTION_MARK = "\x00QUESTION\x00"

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
    prompt_styles = ("ours", "reference", "reference_base", "reference_chat")
    answer_lead = "</think>\n"  # <think> is opened by the prompt

    def system_prompt(self) -> str:
        return R1_REFERENCE_SYSTEM if self.prompt_style != "ours" else R1_SYSTEM

    def layout(self, tokenizer) -> str:
        """"ours", "base" (plain text) or "chat" for this tokenizer under the prompt style."""
        if self.prompt_style == "reference":
            return "chat" if getattr(tokenizer, "chat_template", None) else "base"
        return {"ours": "ours", "reference_base": "base", "reference_chat": "chat"}[self.prompt_style]

    def prompt_ids(self, tokenizer, question: str) -> tuple[str, list[int]]:
        from searchrl.agent.backends import chat_prompt_ids, decode
        from searchrl.agent.tokens import fill_prompt_ids

        layout = self.layout(tokenizer)
        if layout == "ours":
            return super().prompt_ids(tokenizer, question)
        if layout == "chat":  # the question as given, as the reference passes it
            ids = chat_prompt_ids(tokenizer, R1_REFERENCE_SYSTEM, question, self.assistant_prefix)
        else:
            frame = R1_REFERENCE_BASE.replace("{question}", _QUESTION_MARK)
            ids = bos_ids(tokenizer) + fill_prompt_ids(tokenizer, frame, _QUESTION_MARK, question)
        return decode(tokenizer, ids), ids

    def format_passage(self, i: int, title: str, text: str) -> str:
        return f"({i})Title: {title} Text: {text}" if title else f"({i}){text}"

    def documents_text(self, hits, extra_tokens=()) -> str:
        lines = [self._passage_line(i, h, extra_tokens) for i, h in enumerate(hits, 1)] or ["None"]
        return "\n\n" + self.doc_open + "\n" + "\n".join(lines) + "\n" + self.doc_close + "\n\n"

    def empty_query_text(self) -> str:  # not used: an empty query is fatal here
        return "\n\n" + self.doc_open + "\nNone\n" + self.doc_close + "\n\n"

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




def bos_ids(tokenizer) -> list[int]:
    """The special ids the tokenizer puts before a text by default (Llama's BOS; none for Qwen, GPT-2,
    SmolLM2): what a text prompt handed to vLLM or `tokenizer(text)` starts with."""
    plain = list(tokenizer.encode("a", add_special_tokens=False))
    full = list(tokenizer.encode("a", add_special_tokens=True))
    if len(full) > len(plain) and full[len(full) - len(plain):] == plain:
        return full[: len(full) - len(plain)]
    return []
