"""The Search-R1 protocol (Jin et al. 2025, github.com/PeterGriffinJin/Search-R1), so released Search-R1
checkpoints are evaluated with their own prompt, tags and document format.

    <think> reasoning </think> <search> query </search>
    env: "\\n\\n<information>Doc 1(Title: t) text\\nDoc 2(Title: t) text</information>\\n\\n"
    <think> ... </think> <answer> short </answer>

Read from the reference code (`search_r1/llm_agent/generation.py`, `infer.py`):
- Prompt: one user message, the instruction paragraph followed by "Question: {question}\\n", the question
  stripped and ending in "?" (one is appended when missing); the tokenizer's chat template is applied
  when it has one (no system message: the template's default one, e.g. Qwen2.5's, is used), else the
  text is the prompt as is.
- The model's segment is cut at "</search>" (or "</answer>"); the query is the text between the tags,
  `.strip()`-ed. Retrieved passages become "Doc {i}(Title: {title}) {text}" lines; the block is
  "\\n\\n<information>" + lines.strip() + "</information>\\n\\n" (the training rollouts' observation; the
  `infer.py` demo script instead puts the "\\n\\n" before the model's text, a quirk not followed here).
- Differences: an empty query is sent nowhere and an empty "<information></information>" block is
  inserted (the reference would search the empty string); a segment that names neither action ends the
  rollout (the reference's training loop appends "My previous action is invalid ..." and lets the model
  try again); the answer is extracted raw like the other protocols (Search-R1 strips it; the metrics
  normalise whitespace anyway).

Format validation follows the order Search-R1's format reward checks: <think>...</think>, then either
<search>...</search> followed by the environment's <information>...</information> and a new <think>,
or <answer>...</answer> at the end; only whitespace between the blocks.
"""

from __future__ import annotations

import re

from searchrl.agent.protocols.base import Protocol

SEARCH_R1_PROMPT = (
    "Answer the given question. You must conduct reasoning inside <think> and </think> first every time you get "
    "new information. After reasoning, if you find you lack some knowledge, you can call a search engine by "
    "<search> query </search> and it will return the top searched results between <information> and "
    "</information>. You can search as many times as your want. If you find no further external knowledge needed, "
    "you can directly provide the answer inside <answer> and </answer>, without detailed illustrations. For "
    "example, <answer> Beijing </answer>. Question: {question}\n")
_QUESTION_MARK = "\x00QUESTION\x00"
_TAG_RE = re.compile(r"</?(?:think|search|information|answer)>")

# Search-R1's sequence: state -> {tag: next state}
_GRAMMAR = {
    "start": {"<think>": "think"},
    "think": {"</think>": "thought"},
    "thought": {"<search>": "search", "<answer>": "answer"},
    "search": {"</search>": "searched"},
    "searched": {"<information>": "information"},
    "information": {"</information>": "start"},
    "answer": {"</answer>": "end"},
    "end": {},
}
_INSIDE = ("think", "search", "information", "answer")  # states whose text is the block's content


class SearchR1(Protocol):
    name = "search_r1"
    query_open, query_close = "<search>", "</search>"
    doc_open, doc_close = "<information>", "</information>"
    query_cleaning = "strip"
    extra_tags = ("<think>", "</think>")
    prompt_styles = ("reference",)  # Search-R1's own layout is the only one

    def system_prompt(self) -> str:
        return ""  # the instructions are in the user message

    def user_message(self, question: str) -> str:
        q = question.strip()
        return q if q.endswith("?") else q + "?"

    def prompt_ids(self, tokenizer, question: str) -> tuple[str, list[int]]:
        from searchrl.agent.backends import decode
        from searchrl.agent.protocols.r1searcher import bos_ids
        from searchrl.agent.tokens import fill_prompt_ids, render_chat

        user = SEARCH_R1_PROMPT.replace("{question}", _QUESTION_MARK)
        if getattr(tokenizer, "chat_template", None):
            frame, lead = render_chat(tokenizer, [{"role": "user", "content": user}]), []
        else:
            frame, lead = user, bos_ids(tokenizer)
        ids = lead + fill_prompt_ids(tokenizer, frame, _QUESTION_MARK, self.user_message(question))
        return decode(tokenizer, ids), ids

    def format_passage(self, i: int, title: str, text: str) -> str:
        return f"Doc {i}(Title: {title}) {text}" if title else f"Doc {i} {text}"

    def documents_text(self, hits, extra_tokens=()) -> str:
        lines = "\n".join(self._passage_line(i, h, extra_tokens) for i, h in enumerate(hits, 1))
        return "\n\n" + self.doc_open + lines.strip() + self.doc_close + "\n\n"

    def empty_query_text(self) -> str:
        return "\n\n" + self.doc_open + self.doc_close + "\n\n"

    def env_spans(self, text: str) -> list[tuple[int, int]]:
        return self._frame_spans(text, "\n\n" + self.doc_open, self.doc_close + "\n\n")

    def _validate(self, parts):
        errs: list[str] = self._self_written_documents(parts)
        model_text = "".join(t for r, t in parts if r == "model")
        state, pos = "start", 0
        full = "".join(t for _, t in parts)
        for m in _TAG_RE.finditer(full):
            between = full[pos: m.start()]
            if state not in _INSIDE and between.strip():
                errs.append(f"text outside the tags before {m.group()}: {between.strip()[:40]!r}")
                break
            nxt = _GRAMMAR[state].get(m.group())
            if nxt is None:
                want = " or ".join(_GRAMMAR[state]) or "nothing"
                errs.append("actions after the answer" if state == "end" else
                            f"tag order: {m.group()} where {want} was expected")
                break
            if state == "search" and not self.clean_query(full[pos: m.start()]):
                errs.append("empty query")
            state, pos = nxt, m.end()
        else:
            if state != "end":
                errs.append("answer missing" if "<answer>" not in model_text else f"unfinished {state} block")
            elif full[pos:].strip():
                errs.append(f"text after the answer: {full[pos:].strip()[:40]!r}")
        if state == "end" and not (self.extract_answer(model_text) or "").strip():
            errs.append("answer empty")
        errs.extend(self._garbled(model_text))
        return errs
