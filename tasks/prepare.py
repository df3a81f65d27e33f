"""DVC stage `prepare`: QA splits + corpus from params.prepare.source.

Writes <out_dir>/{train,eval,seen,corpus}.parquet, contamination.json and stats.json (the DVC metrics);
every frame is validated with Great Expectations before anything is published. For the Knowledge
World with `probe.enabled`, the base policy answers each real fact closed-book first (cached in
`probe.cache_path`, so a rerun with the same policy loads no model at all).
"""

from __future__ import annotations

import logging

from searchrl import tracking
from searchrl.config import Params
from searchrl.data.prepare import PreparedData, prepare_data, write_outputs
from searchrl.stage import run_stage, stage_args
from searchrl.validation import validate_frame

log = logging.getLogger("searchrl.prepare")


def policy_answer_fn(params: Params):
    """(answer_fn, prompt_key) for the knowledge probe; the policy is loaded on the first call only."""
    from searchrl.agent import backends

    probe_cfg = params.prepare.knowledge_world.probe
    state: dict = {}

    def answer_fn(questions: list[str]) -> list[str]:
        if "backend" not in state:
            log.info("probe: loading policy %s to ask %d facts closed-book", params.policy.model, len(questions))
            state["backend"] = backends.make_backend(params.policy, params.agent)
        return backends.answer_closed_book(state["backend"], questions, max_new_tokens=probe_cfg.max_new_tokens,
                                           batch_size=probe_cfg.batch_size)

    prompt_key = f"{backends.CLOSED_BOOK_SYSTEM}|max_new_tokens={probe_cfg.max_new_tokens}|{params.policy.dtype}"
    return answer_fn, prompt_key


def validate(data: PreparedData) -> None:
    for name, (kind, frame) in data.frames().items():
        if frame.empty and name != "corpus":
            continue  # e.g. seen.parquet outside the Knowledge World; an empty corpus fails its suite
        options = {"splits": [name]} if kind == "qa" else {}
        validate_frame(frame, kind, name, **options)


def prepare(params: Params) -> dict:
    answer_fn, prompt_key = None, ""
    if params.prepare.source == "knowledge_world" and params.prepare.knowledge_world.probe.enabled:
        answer_fn, prompt_key = policy_answer_fn(params)
    data = prepare_data(params, answer_fn, prompt_key)
    validate(data)
    write_outputs(data, params.prepare.out_dir)
    s = data.stats
    log.info("prepare: train %d, eval %d, seen %d, corpus %d passages; duplicates removed %s; "
             "eval questions also in train: %d", s["train"]["n"], s["eval"]["n"], s["seen"]["n"], s["corpus"]["n"],
             s["duplicates_removed"], s["contamination"].get("eval", 0))
    if "probe" in s:
        log.info("prepare: probe known rate %.3f (%d of %d real facts)", s["probe"]["known_rate"],
                 s["probe"]["n_known"], s["probe"]["n_facts"])
    tracking.log_metrics(tracking.flatten(s))
    return s


def main(argv: list[str] | None = None) -> None:
    stage_args("tasks.prepare", __doc__, argv)
    run_stage("prepare", prepare)


if __name__ == "__main__":
    main()
