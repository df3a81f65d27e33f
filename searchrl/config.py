"""Typed schema of params.yaml: one pydantic model per stage section.

Every knob of the pipeline lives in params.yaml (the embedded default). Presets under configs/ are
partial overlays deep-merged on top of it (`load_params(preset=...)`), and `--set a.b=c` overrides a
single value. Validation is strict: an unknown key, a wrong type or a missing input file is reported
in one line that names the key path, e.g.

    params.yaml: unknown key 'index.factroy' (did you mean 'factory'?)

Paths to inputs outside the pipeline (e.g. ../shared/data) are relative to the project root (the
directory holding pyproject.toml / .dvc); pipeline artifacts are relative to the working directory
DVC runs the stage in.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from searchrl.errors import ConfigError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ----------------------------------------------------------------------------- shared
def check_device(value: str) -> str:
    """auto | cpu | cuda | cuda:N; anything else is a ValueError with the closest valid spelling.
    (Whether this machine has that CUDA device is checked at stage start: searchrl.models.check_devices.)"""
    if re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        return value
    v = value.strip().lower().replace(" ", "")
    gpu = re.fullmatch(r"(?:gpu|cuda|nvidia)[:_-]?(\d*)", v)
    if gpu:
        fix = "cuda" + (f":{gpu.group(1)}" if gpu.group(1) else "")
    elif re.fullmatch(r"auto|cpu|cuda(:\d+)?", v):
        fix = v
    else:
        fix = next(iter(difflib.get_close_matches(v, ["auto", "cpu", "cuda", "cuda:0"], n=1)), None)
    hint = f"; did you mean '{fix}'?" if fix else ""
    raise ValueError(f"'{value}' is not a device (auto, cpu, cuda or cuda:N){hint}")


Device = Annotated[str, AfterValidator(check_device)]


def check_file_path(value: str) -> str:
    """A cache or store file (SQLite, JSON): not a directory (checked against the project and the
    current workspace when params load; the stores check again when they open)."""
    from searchrl.io import file_path_problem

    problem = file_path_problem(value)
    if problem:
        raise ValueError(problem)
    return value


FilePath = Annotated[str, AfterValidator(check_file_path)]
# the same, where "" means "no file" (an optional cache)
OptionalFilePath = Annotated[str, AfterValidator(lambda value: check_file_path(value) if value else value)]


class PolicyCfg(Section):
    model: str = "smollm2-135m-instruct"  # embedded alias, hub id, or local dir
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    device: Device = "auto"  # auto | cpu | cuda | cuda:N


class TrackingCfg(Section):
    uri: str = "sqlite:///mlflow.db"  # MLFLOW_TRACKING_URI in the environment wins
    experiment: str = "searchrl"
    registered_model: str = "searchrl-policy"


# the tag protocols (searchrl/agent/protocols: PROTOCOLS has the same names, tests/unit/test_protocols.py checks)
PROTOCOLS = ("r1searcher_pp", "r1searcher", "search_r1", "tool_call")
ProtocolName = Literal["r1searcher_pp", "r1searcher", "search_r1", "tool_call"]


class AgentCfg(Section):
    """The multi-turn search loop shared by evaluation, rejection sampling and RL."""

    protocol: ProtocolName = "r1searcher_pp"
    # the prompt layout, for protocols that have several (searchrl/agent/protocols): "ours", or R1-Searcher's
    # own (reference: its chat layout if the tokenizer has a chat template, else its plain-text Base layout;
    # reference_base / reference_chat: that one). search_r1 always uses Search-R1's, the others ours.
    prompt_style: Literal["ours", "reference", "reference_base", "reference_chat"] = "ours"
    backend: Literal["hf", "vllm", "vllm_server"] = "hf"
    max_retrievals: int = Field(8, ge=0)
    max_segment_tokens: int = Field(512, ge=1)
    max_total_tokens: int = Field(1024, ge=1)
    max_query_chars: int = Field(300, ge=1)
    max_passage_words: int = Field(120, ge=1)
    top_k: int = Field(3, ge=1)
    batch_size: int = Field(32, ge=1)
    cache_path: FilePath = "data/cache/retrieval.sqlite"
    # a retrieval call that raises is retried this many times (exponential backoff from
    # retrieval_backoff_s, with jitter) before the stage stops with one line naming index and query
    retrieval_retries: int = Field(3, ge=0)
    retrieval_backoff_s: float = Field(0.5, ge=0)
    # Stop generating at the answer's closing tag (R1-Searcher's evaluation); false = let the model end
    # the rollout itself (EOS after </answer>, as in R1-Searcher's training rollouts).
    stop_at_answer: bool = True
    # HF backend: reuse the KV of each rollout's history across retrieval rounds (and of the shared
    # system prompt) instead of recomputing it; same outputs, less compute.
    kv_reuse: bool = True
    # HF backend: a rollout whose query was answered rejoins the running batch at once (continuous
    # batching) instead of waiting for every rollout of the round to stop; same tokens, fewer decode steps.
    continuous_batching: bool = True
    vllm_gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    vllm_max_model_len: int = Field(0, ge=0)  # 0 = the model's own context length
    # backend vllm_server: a policy served by `vllm serve` (searchrl/agent/vllm_server.py), one HTTP request
    # per rollout row, vllm_server_concurrency in flight. vllm_server_model: the served name to ask for;
    # "" = the model the stage would load (policy.model, models/sft, ...), so a server that serves another
    # model is refused rather than silently evaluated
    vllm_server_url: str = ""  # e.g. http://127.0.0.1:8000
    vllm_server_model: str = ""
    vllm_server_concurrency: int = Field(128, ge=1)
    vllm_server_timeout_s: float = Field(600.0, gt=0)

    @model_validator(mode="after")
    def _server_url(self) -> AgentCfg:
        if self.backend == "vllm_server" and not re.match(r"^https?://\S+$", self.vllm_server_url):
            got = f"'{self.vllm_server_url}'" if self.vllm_server_url else "nothing"
            raise ValueError(f"agent.vllm_server_url: backend vllm_server needs the server's http(s) URL, e.g. "
                             f"http://127.0.0.1:8000 (got {got})")
        return self


# ----------------------------------------------------------------------------- prepare
class ProbeCfg(Section):
    enabled: bool = True
    max_new_tokens: int = Field(12, ge=1)
    batch_size: int = Field(32, ge=1)
    cache_path: OptionalFilePath = "data/cache/probe.json"  # "" = no cache


class KnowledgeWorldCfg(Section):
    n_people: int = Field(60, ge=2)
    n_companies: int = Field(30, ge=2)
    n_works: int = Field(30, ge=2)
    n_countries: int = Field(0, ge=0)  # 0 = all built-in countries
    n_train: int = Field(240, ge=1)
    n_eval: int = Field(120, ge=1)
    n_seen: int = Field(60, ge=0)
    eval_entity_fraction: float = Field(0.3, gt=0, lt=1)
    question_mix: dict[str, float] = {
        "real_1hop": 1.0,
        "fictional_1hop": 1.0,
        "bridge_fictional_real": 1.0,
        "fictional_2hop": 1.0,
        "comparison": 1.0,
        "mixed_3hop": 1.0,
    }
    probe: ProbeCfg = ProbeCfg()


class FileSpec(Section):
    path: str
    format: Literal["auto", "r1searcher", "flashrag", "hotpotqa", "ircot", "musique", "passages"] = "auto"
    dataset: str | None = None  # name stored on each record; default: file stem
    limit: int = Field(0, ge=0)  # 0 = all rows


class JsonlSourceCfg(Section):
    train: list[FileSpec] = []
    eval: list[FileSpec] = []
    corpus: list[FileSpec] = []
    corpus_from_contexts: bool = True  # add paragraphs found inside QA files to the corpus
    chunk_words: int = Field(0, ge=0)  # 0 = keep passages whole; 100 = KILT-style chunks
    title_in_text: bool = True  # prepend the title to each chunk as R1-Searcher's KILT split


class HfDatasetSpec(Section):
    name: Literal["hotpotqa", "2wikimultihopqa", "musique", "bamboogle"]
    split: str = "validation"
    role: Literal["train", "eval"] = "eval"
    limit: int = Field(0, ge=0)
    path: str | None = None  # hub id or local dir; default per dataset
    config: str | None = None


class HfSourceCfg(Section):
    datasets: list[HfDatasetSpec] = []
    corpus: list[FileSpec] = []  # local passage files added to the datasets' context paragraphs
    corpus_from_contexts: bool = True
    chunk_words: int = Field(0, ge=0)
    title_in_text: bool = True


class PrepareCfg(Section):
    source: Literal["knowledge_world", "jsonl", "hf"] = "knowledge_world"
    out_dir: str = "data/prepared"
    knowledge_world: KnowledgeWorldCfg = KnowledgeWorldCfg()
    jsonl: JsonlSourceCfg = JsonlSourceCfg()
    hf: HfSourceCfg = HfSourceCfg()

    def input_files(self) -> list[Path]:
        """The local files this source reads (resolved), so the prepare stage can depend on them."""
        if self.source == "jsonl":
            specs = self.jsonl.train + self.jsonl.eval + self.jsonl.corpus
        elif self.source == "hf":
            specs = list(self.hf.corpus)
        else:
            specs = []
        return list(dict.fromkeys(resolve_input(s.path).resolve() for s in specs))


# ----------------------------------------------------------------------------- index
def check_faiss_factory(factory: str) -> None:
    """ValueError naming `index.factory` unless faiss parses it (at a dimension most PQ splits divide)."""
    import faiss

    try:
        faiss.index_factory(3072, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        why = str(err).rsplit(":", 1)[-1].strip()
        raise ValueError(f"index.factory: faiss cannot build '{factory}' ({why}); e.g. Flat, HNSW32,Flat, "
                         "IVF4096,PQ64, HNSW32,SQ8") from None


class IndexCfg(Section):
    kind: Literal["dense", "bm25"] = "dense"
    encoder: str = "all-minilm-l6-v2"  # embedded alias, hub id or local dir
    query_instruction: str = ""  # BGE: "Represent this sentence for searching relevant passages: "
    passage_prefix: str = ""  # E5: "passage: "
    factory: str = "Flat"  # any faiss index_factory string: Flat, HNSW32,Flat, IVF256,PQ16 ...
    normalize: bool = True
    batch_size: int = Field(128, ge=1)
    shard_size: int = Field(8192, ge=1)  # passages per resumable embedding shard
    max_length: int = Field(256, ge=8)
    device: Device = "auto"  # encoder device: auto | cpu | cuda | cuda:N
    train_sample: int = Field(100_000, ge=1)  # vectors sampled to train IVF / PQ factories
    nprobe: int = Field(16, ge=1)  # IVF lists visited per query (search time)
    ef_search: int = Field(64, ge=1)  # HNSW efSearch (search time)
    keep_embeddings: bool = True  # keep the shards after a build: a new factory re-uses them
    work_dir: str = ""  # embedding shards; "" = <out_dir>.work next to the index
    out_dir: str = "data/index"

    @model_validator(mode="after")
    def _factory_parses(self) -> IndexCfg:
        if self.kind == "dense":
            check_faiss_factory(self.factory)
        return self


# ----------------------------------------------------------------------------- retrieval
class RetrievalServeCfg(Section):
    """The retrieval server the flow starts for a run (`managed`): `python -m searchrl.retrieval.serve
    --index <index.out_dir>` once, before the first stage that searches (sample, rl, rl_ablation@*,
    evaluate) and only if one of them will run; its GET /health awaited; stopped with its process group
    when the run ends, fails or is interrupted. Log: `<log_dir>/retrieval_server.log` in the workspace."""

    managed: bool = False
    host: str = "127.0.0.1"  # 0.0.0.0 serves other machines (the server has no authentication)
    port: int = Field(8765, ge=1, le=65535)
    threads: int = Field(0, ge=0)  # faiss + torch threads of the searching thread; 0 = all CPUs
    max_batch: int = Field(64, ge=1)  # queries per coalesced index search
    max_wait_ms: float = Field(2.0, ge=0)  # what a lone request may wait for others to batch with
    startup_timeout_s: float = Field(1800.0, gt=0)  # a Wikipedia-scale index loads in minutes
    stop_grace_s: float = Field(30.0, ge=0)
    log_dir: str = "logs"
    extra_args: list[str] = []  # appended, e.g. [--nprobe, "64"] or [--fail-rate, "0.2"]

    def base_url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"


class WebSearchCfg(Section):
    """Online web search for the evaluate stage (`retrieval.backend: web`; searchrl/retrieval/web.py), as
    R1-Searcher's online evaluation (METHOD.md B.8): a Serper-style search API, the first `pages` result
    pages fetched and summarised for the query by an LLM, the summaries inserted as documents. Every
    search, page and summary is recorded in `replay_path` (SQLite, DVC-trackable); `mode: replay` re-runs
    from it alone, offline, bit for bit. Keys are read from the environment variables named here."""

    mode: Literal["online", "replay"] = "online"
    replay_path: FilePath = "data/web/replay.sqlite"
    search_url: str = "https://google.serper.dev/search"
    search_key_env: str = "SERPER_API_KEY"
    site: str = "en.wikipedia.org"  # appended as " site:<site>" (the reference's); "" = the whole web
    results: int = Field(10, ge=1)  # "num" asked of the search API
    pages: int = Field(3, ge=1)  # result pages fetched and summarised per query, in rank order
    first_summary_only: bool = True  # the reference: the first relevant summary is the only document
    max_page_bytes: int = Field(5_000_000, ge=1024)  # a larger page is abandoned while streaming
    max_page_chars: int = Field(35_000, ge=100)  # page text given to the summariser (the reference's cut)
    timeout_s: float = Field(20.0, gt=0)
    retries: int = Field(3, ge=0)  # 429 / 5xx / network errors, exponential backoff from backoff_s
    backoff_s: float = Field(1.0, ge=0)
    requests_per_second: float = Field(2.0, gt=0)  # search API rate limit (all threads together)
    concurrency: int = Field(4, ge=1)  # queries searched at once
    user_agent: str = "searchrl-eval/0.1 (research evaluation)"
    # an OpenAI-compatible base URL (http(s)://host/v1), or a local model (dir, hub id, embedded alias) run
    # through our own backends
    summarizer: str = "https://api.openai.com/v1"
    summarizer_model: str = "gpt-4o-mini"
    summarizer_key_env: str = "OPENAI_API_KEY"  # "" = send no key (a local server)
    summarizer_max_tokens: int = Field(512, ge=16)

    @model_validator(mode="after")
    def _urls(self) -> WebSearchCfg:
        if not re.match(r"^https?://\S+$", self.search_url):
            raise ValueError(f"retrieval.web.search_url: '{self.search_url}' is not an http(s) URL")
        if not self.summarizer:
            raise ValueError("retrieval.web.summarizer: give an OpenAI-compatible base URL or a local model")
        return self


class RetrievalCfg(Section):
    """Where the stages that search (sample, rl, evaluate) get their passages; searchrl/retrieval/
    factory.py. `url` "" = the index at index.out_dir, loaded in process; an http(s) URL = a retrieval
    service (`api: searchrl`, our `python -m searchrl.retrieval.serve`, whose results and cache keys are
    the in-process ones) or a Search-R1-style server (`api: search_r1`, POST /retrieve; the cache key is
    derived from url + a probe answer: searchrl/retrieval/http.py). Either way the SQLite retrieval cache
    (agent.cache_path) and the retry policy (agent.retrieval_retries / retrieval_backoff_s) sit in front.
    Not a DVC parameter, like `launcher`: where the index is served does not change what it returns.
    This section is shared: other retrieval backends add their own keys here.
    `backend: web` (evaluation only: the evaluate stage searches the web through `web`; sample and rl keep
    the index, which is what the policy is trained on)."""

    backend: Literal["index", "web"] = "index"
    web: WebSearchCfg = WebSearchCfg()
    url: str = ""
    api: Literal["searchrl", "search_r1"] = "searchrl"
    timeout_s: float = Field(60.0, gt=0)  # read timeout of one request (a retry follows)
    connect_timeout_s: float = Field(5.0, gt=0)
    pool_size: int = Field(32, ge=1)  # pooled connections per process
    serve: RetrievalServeCfg = RetrievalServeCfg()

    @model_validator(mode="after")
    def _url(self) -> RetrievalCfg:
        if self.url and not re.match(r"^https?://[^\s/]+(/\S*)?$", self.url):
            raise ValueError(f"retrieval.url: '{self.url}' is not an http(s) URL such as http://127.0.0.1:8765 "
                             "(\"\" = the index in process)")
        return self


# ----------------------------------------------------------------------------- sample / sft / rl
SAMPLERS = ("policy", "teacher", "oracle")


class DifficultyCfg(Section):
    """R1-Searcher's difficulty label per question (METHOD.md B.3), from the rate of correct answers
    among the model sampler's rollouts: easy if rate >= easy_min_rate, medium if >= medium_min_rate,
    else difficult. The paper's "< 10 / 10-20 / > 20 rollouts to be correct" is rate > 0.1 / 0.05-0.1 /
    < 0.05 (configs/paper.yaml); the default suits 8 samples of a small model."""

    easy_min_rate: float = Field(0.5, ge=0, le=1)
    medium_min_rate: float = Field(0.01, ge=0, le=1)

    @model_validator(mode="after")
    def _ordered(self) -> DifficultyCfg:
        if self.medium_min_rate > self.easy_min_rate:
            raise ValueError(f"sample.difficulty: medium_min_rate ({self.medium_min_rate}) must not exceed "
                             f"easy_min_rate ({self.easy_min_rate})")
        return self


class SampleCfg(Section):
    """Rejection sampling for the SFT cold start (searchrl/training/sampling.py)."""

    # samplers in order; each later one only fills questions left short of keep_per_question. oracle = the
    # source's gold evidence (Knowledge World hop chains, or the formats in formats.EVIDENCE_FORMATS):
    # checked against prepare's training inputs at load time (Params._check_oracle_evidence)
    sampler: list[Literal["policy", "teacher", "oracle"]] = ["policy", "oracle"]
    teacher_model: str | None = None  # local dir / hub id / vllm:<id> / http(s)://host/v1 (OpenAI-compatible)
    teacher_api: Literal["completions", "chat"] = "completions"  # HTTP teachers only
    teacher_served_model: str = ""  # model name sent to an HTTP endpoint ("" = the server's default)
    teacher_api_key_env: str = "OPENAI_API_KEY"  # env var holding the key; never logged or written
    teacher_concurrency: int = Field(8, ge=1)  # parallel HTTP requests
    teacher_timeout_s: float = Field(120.0, gt=0)
    n_samples: int = Field(8, ge=1)  # rollouts per question (policy / teacher)
    oracle_variants: int = Field(2, ge=1)  # differently worded oracle trajectories per question
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    keep_per_question: int = Field(2, ge=1)
    max_questions: int = Field(0, ge=0)  # training questions sampled (a seeded subset); 0 = all
    # the policy / teacher sample only this many of them (seeded subset; 0 = all): on a CPU the policy
    # is the slow sampler, while the oracle fills every question
    model_max_questions: int = Field(0, ge=0)
    max_answer_words: int = Field(10, ge=1)
    difficulty: DifficultyCfg = DifficultyCfg()
    out_dir: str = "data/sft"

    @model_validator(mode="before")
    @classmethod
    def _sampler_list(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("sampler"), str):
            data = {**data, "sampler": [data["sampler"]]}
        return data

    @model_validator(mode="after")
    def _check_samplers(self) -> SampleCfg:
        if not self.sampler:
            raise ValueError("sample.sampler: empty; name at least one of policy, teacher, oracle")
        if len(set(self.sampler)) != len(self.sampler):
            raise ValueError(f"sample.sampler: {self.sampler} names a sampler twice")
        if "teacher" in self.sampler and not self.teacher_model:
            raise ValueError("sample.teacher_model: the teacher sampler needs a model (local dir, hub id, "
                             "vllm:<id> or http(s)://host/v1)")
        return self


# transformers' SchedulerType values (tests/unit/test_config_enums.py keeps the two in step); a Literal so
# that a typo fails when params are loaded, before any stage touches its checkpoints
LrScheduler = Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                      "constant_with_warmup", "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr",
                      "cosine_warmup_with_min_lr", "warmup_stable_decay", "greedy"]


class SftCfg(Section):
    """Masked SFT cold start (searchrl/training/sft.py); batch_size is the effective batch
    (micro_batch_size x gradient accumulation)."""

    epochs: float = Field(2, gt=0)
    batch_size: int = Field(8, ge=1)
    micro_batch_size: int = Field(8, ge=1)
    lr: float = Field(2e-5, gt=0)
    lr_scheduler: LrScheduler = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    max_length: int = Field(1024, ge=16)  # longer examples are dropped (never truncated)
    use_lora: bool = False
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    gradient_checkpointing: bool = False  # CUDA only (ignored on CPU)
    logging_steps: int = Field(1, ge=1)
    save_steps: int = Field(50, ge=1)
    save_total_limit: int = Field(2, ge=1)
    checkpoint_dir: str = "models/.sft-checkpoints"  # not a DVC output: survives an interrupted run
    out_dir: str = "models/sft"

    @model_validator(mode="after")
    def _accumulation(self) -> SftCfg:
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"sft.batch_size ({self.batch_size}) must be a multiple of sft.micro_batch_size "
                             f"({self.micro_batch_size})")
        return self


Difficulty = Literal["easy", "medium", "difficult"]


class RewardCfg(Section):
    """Outcome reward (searchrl/rewards.py): R1-Searcher++ (format + answer + group) or one of
    R1-Searcher's two stages."""

    kind: Literal["r1searcher_pp", "r1searcher_stage1", "r1searcher_stage2"] = "r1searcher_pp"
    format_penalty: float = -2.0
    max_answer_words: int = Field(10, ge=1)
    group_reward: bool = True
    group_form: Literal["two_sigma_sq", "sigma", "range"] = "two_sigma_sq"
    group_std: Literal["population", "sample"] = "population"
    group_clip: float = Field(2.0, ge=0)  # eta


class RlPhaseCfg(Section):
    """One of several consecutive RL phases (R1-Searcher: stage 1 then stage 2); each starts from the
    previous phase's weights with a fresh optimizer."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_-]+$")
    reward: RewardCfg = RewardCfg()
    max_steps: int = Field(ge=1)
    difficulty: list[Difficulty] | None = None  # None: rl.difficulty


class RlCfg(Section):
    """RL for dynamic knowledge acquisition (searchrl/training/rl.py)."""

    init: str = "models/sft"  # model dir, embedded alias, hub id, or "policy" (= policy.model)
    protocol: ProtocolName = "r1searcher_pp"
    estimator: Literal["reinforce_pp_baseline", "grpo"] = "reinforce_pp_baseline"
    reward: RewardCfg = RewardCfg()
    phases: list[RlPhaseCfg] = []  # empty: one phase of `max_steps` steps with `reward`
    memorization: bool = True
    memorization_weight: float = Field(0.1, ge=0)  # mu
    rewriter: Literal["policy", "teacher", "oracle"] = "oracle"  # oracle: gold evidence, as sample.sampler
    rewrite_max_tokens: int = Field(160, ge=8)
    num_generations: int = Field(4, ge=2)
    prompts_per_step: int = Field(2, ge=1)
    micro_batch_size: int = Field(4, ge=1)  # sequences per forward/backward (the step accumulates over all)
    max_steps: int = Field(10, ge=1)
    lr: float = Field(2e-6, gt=0)
    beta: float = Field(1e-4, ge=0)
    epsilon: float = Field(0.2, gt=0)
    advantage_clip: float = Field(10.0, gt=0)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_total_tokens: int = Field(0, ge=0)  # 0: agent.max_total_tokens
    difficulty: list[Difficulty] = ["medium", "difficult"]  # [] = every training question
    save_steps: int = Field(5, ge=1)
    collapse_window: int = Field(5, ge=2)
    collapse_format_drop: float = Field(0.3, gt=0, le=1)  # absolute drop of the format-valid rate
    collapse_reward_drop: float = Field(0.3, gt=0)  # drop of the mean reward
    # How the per-token losses of one step are aggregated (the papers: OpenRLHF's masked mean over each
    # sequence's policy tokens, then the mean over sequences). token_mean: one mean over every policy
    # token of the step (DAPO); seq_mean_token_sum: each sequence's token sum, mean over sequences.
    loss_aggregation: Literal["seq_mean_token_mean", "token_mean", "seq_mean_token_sum"] = "seq_mean_token_mean"
    # A rollout that ended on a length cap mid-turn (finish "length") is excluded from the loss when true
    # (the papers train on it: false). The truncation rate is logged every step either way.
    mask_truncated: bool = False
    # Dynamic sampling (DAPO): a group whose rewards are all equal carries no signal; when true such groups
    # are replaced by groups of newly drawn questions, up to dynamic_sampling_max_draws extra draws per step
    # (then the step keeps what it has). The informative fraction is logged every step either way.
    dynamic_sampling: bool = False
    dynamic_sampling_max_draws: int = Field(3, ge=1)
    # memorization on but an empty memorization set for this many steps in a row: a loud warning
    memorization_warn_steps: int = Field(3, ge=1)
    # LoRA on the policy (one GPU): only the adapters train; the frozen base under them is the KL reference
    # (the phase's starting weights); each phase publishes the merged model
    use_lora: bool = False
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less memory, ~30% more compute
    vllm_gpu_memory_utilization: float = Field(0.3, gt=0, le=1)  # colocated vLLM's share of the GPU (TRL)
    use_vllm: bool = False
    vllm_mode: Literal["colocate", "server"] = "colocate"
    vllm_server_base_url: str | None = None
    # Importance-sampling correction of vLLM rollouts for the train/inference logprob mismatch (TRL's
    # vllm_importance_sampling_*; TRL's own default is on, sequence_mask). The papers have none: off.
    # *_truncate clips the ratio to [importance_sampling_min, importance_sampling_cap], *_mask zeroes
    # tokens / sequences outside it. HF rollouts come from the training weights themselves; the mismatch
    # |logp_train - logp_rollout| is logged every step whatever this setting.
    importance_sampling: Literal["off", "token_truncate", "token_mask", "sequence_truncate",
                                 "sequence_mask"] = "off"
    importance_sampling_cap: float = Field(3.0, gt=1)
    importance_sampling_min: float | None = Field(None, ge=0, lt=1)
    checkpoint_dir: str = "models/.rl-checkpoints"  # not a DVC output: survives an interrupted run
    metrics_dir: str = "reports/rl"
    out_dir: str = "models/rl"

    @model_validator(mode="after")
    def _check(self) -> RlCfg:
        if self.memorization and self.protocol != "r1searcher_pp":
            raise ValueError("rl.memorization: the memorization loss rewrites into <internal> steps, which "
                             "only the r1searcher_pp protocol has (set memorization: false)")
        for ph in (p.reward for p in self.run_phases()):
            if (ph.kind == "r1searcher_pp") != (self.protocol == "r1searcher_pp"):
                raise ValueError(f"rl.reward.kind '{ph.kind}' does not fit rl.protocol '{self.protocol}' "
                                 "(r1searcher_pp rewards need the r1searcher_pp protocol; R1-Searcher's rewards, format "
                                 "from the protocol's validator, fit r1searcher, search_r1 and tool_call)")
        return self

    @model_validator(mode="after")
    def _micro_batches(self) -> RlCfg:
        if (self.num_generations * self.prompts_per_step) % self.micro_batch_size:
            raise ValueError(f"rl.micro_batch_size ({self.micro_batch_size}) must divide num_generations x "
                             f"prompts_per_step ({self.num_generations * self.prompts_per_step})")
        return self

    def run_phases(self) -> list[RlPhaseCfg]:
        """The phases to run, in order (one built from the top-level fields when `phases` is empty)."""
        return list(self.phases) or [RlPhaseCfg(name="rl", reward=self.reward, max_steps=self.max_steps)]


# ----------------------------------------------------------------------------- evaluate
EVAL_METHODS = ("direct", "rag", *(f"agent_{p}" for p in PROTOCOLS), "sft", "rl")


class JudgeCfg(Section):
    """The LLM judge behind LasJ (METHOD.md B.7, C; searchrl/judge.py)."""

    # none: no LasJ; openai: any OpenAI-compatible chat endpoint (base_url); local: `model` run by our own
    # backend (agent.backend hf / vllm), e.g. the embedded smollm2-135m-instruct as a stand-in
    backend: Literal["none", "openai", "local"] = "none"
    model: str = "gpt-4o-mini"  # openai: the served model name; local: an embedded alias, local dir or hub id
    base_url: str = "https://api.openai.com/v1"  # openai only
    api_key_env: str = "OPENAI_API_KEY"  # env var holding the key ("" = send none); never logged or written
    concurrency: int = Field(16, ge=1)  # parallel HTTP requests
    max_retries: int = Field(5, ge=0)  # on 408/409/429/5xx and network errors
    backoff_s: float = Field(1.0, ge=0)  # first retry wait, doubled each time (a Retry-After header wins)
    timeout_s: float = Field(60.0, gt=0)
    max_tokens: int = Field(1024, ge=1)  # the reference's; a local model needs only a few
    temperature: float | None = Field(None, ge=0)  # None = the endpoint's default, as the reference
    batch_size: int = Field(16, ge=1)  # local only
    cache_path: FilePath = "data/cache/judge.sqlite"  # verdicts by (model, prompt version, question, golds, prediction)

    @model_validator(mode="after")
    def _endpoint(self) -> JudgeCfg:
        if self.backend == "openai" and not re.match(r"^https?://\S+$", self.base_url):
            raise ValueError(f"evaluate.judge.base_url: backend openai needs the endpoint's http(s) URL, e.g. "
                             f"https://api.openai.com/v1 (got '{self.base_url}')")
        if self.backend != "none" and not self.model:
            raise ValueError("evaluate.judge.model: empty; name the judge model")
        return self


class EvaluateCfg(Section):
    # EVAL_METHODS, plus `rl_<name>` for each entry of rl_ablations (the model that ablation trains)
    methods: list[str] = ["direct", "rag"]
    top_k: int = Field(5, ge=1)
    max_new_tokens: int = Field(32, ge=1)
    batch_size: int = Field(16, ge=1)
    max_questions: int = Field(0, ge=0)  # 0 = all
    out_dir: str = "reports/eval"
    judge: JudgeCfg = JudgeCfg()
    # multi-sample evaluation: `samples` answers per question for each seed of `seeds` ([] = [seed]); every
    # metric is a mean over questions (each question's samples averaged first) with a 95% bootstrap interval
    samples: int = Field(1, ge=1)
    seeds: list[int] = []
    temperature: float = Field(0.0, ge=0)  # 0 = greedy (the default: one sample, one seed)
    top_p: float = Field(1.0, gt=0, le=1)
    bootstrap: int = Field(1000, ge=0)  # resamples of the questions for the intervals (0 = no intervals)
    # paired comparisons [a, b]: per-question a - b with its interval; [] = every method against the first
    compare: list[tuple[str, str]] = []

    @model_validator(mode="after")
    def _sampling(self) -> EvaluateCfg:
        if (self.samples > 1 or len(self.seeds) > 1) and self.temperature == 0:
            raise ValueError(f"evaluate.temperature: 0 (greedy) gives identical samples; set it > 0 for "
                             f"samples={self.samples}, seeds={self.seeds}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"evaluate.seeds: {self.seeds} repeats a seed")
        return self

    def seed_list(self, default: int) -> list[int]:
        """The seeds to evaluate with: `seeds`, or `[default]` (params.seed) when empty."""
        return list(self.seeds) or [default]

    def comparisons(self) -> list[tuple[str, str]]:
        """The paired comparisons to report: `compare`, or each method against the first one."""
        if self.compare:
            return [tuple(pair) for pair in self.compare]
        return [(m, self.methods[0]) for m in self.methods[1:]]


class LauncherCfg(Section):
    """How the sft and rl stages start (searchrl/launch.py): one process, or `accelerate launch` with
    `processes` processes per machine (one per GPU) and an accelerate config (configs/accelerate/)."""

    processes: int = Field(1, ge=1)
    config_file: str = ""  # e.g. configs/accelerate/zero3.yaml; "" = accelerate's defaults (DDP)
    machines: int = Field(1, ge=1)
    machine_rank: int = Field(0, ge=0)
    main_process_ip: str = ""
    main_process_port: int = Field(29500, ge=1, le=65535)
    extra_args: list[str] = []  # more `accelerate launch` flags

    @model_validator(mode="after")
    def _multi_node(self) -> LauncherCfg:
        if self.machines > 1 and not self.main_process_ip:
            raise ValueError("launcher.main_process_ip: set it to rank 0's address when machines > 1")
        if self.machine_rank >= self.machines:
            raise ValueError(f"launcher.machine_rank ({self.machine_rank}) must be < launcher.machines "
                             f"({self.machines})")
        return self


class VllmServerCfg(Section):
    """A vLLM server the flow starts for the RL stages in server mode (`rl.use_vllm`, `rl.vllm_mode:
    server`; flows/pipeline.py): before such a stage runs, `command` is started on its own GPUs, the
    flow waits for GET /health, the stage trains against it (TRL syncs the weights into it each step),
    and the server is stopped when the stage ends, fails or is interrupted. Its output goes to
    `<log_dir>/vllm_server_<stage>.log` in the workspace. Like `launcher`, not a DVC parameter: where
    the server runs does not change what is trained. The managed server's URL (host, port) becomes
    `rl.vllm_server_base_url` when that is unset."""

    managed: bool = False
    # {python} {model} {host} {port} {tensor_parallel_size} {gpu_memory_utilization} {dtype} are filled in;
    # the flags are the ones `trl vllm-serve` adds for TRL's trainers (NCCL weight transfer, the logprobs of
    # the distribution actually sampled from, no cap on logprobs)
    command: list[str] = ["vllm", "serve", "{model}", "--host", "{host}", "--port", "{port}",
                          "--tensor-parallel-size", "{tensor_parallel_size}",
                          "--gpu-memory-utilization", "{gpu_memory_utilization}", "--dtype", "{dtype}",
                          "--weight-transfer-config", '{"backend": "nccl"}',
                          "--logprobs-mode", "processed_logprobs", "--max-logprobs", "-1"]
    extra_args: list[str] = []  # appended to command, e.g. [--max-model-len, "9216", --max-num-seqs, "256"]
    model: str = ""  # "" = the stage's RL init model (rl.init): its weights are the rollout policy of step 0
    gpus: str = ""  # CUDA_VISIBLE_DEVICES of the server, e.g. "7"; "" = inherited
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    startup_timeout_s: float = Field(1200.0, gt=0)  # a 7B model loads and captures CUDA graphs in minutes
    stop_grace_s: float = Field(60.0, ge=0)  # SIGTERM, then SIGKILL after this long
    log_dir: str = "logs"
    # added to the flow's environment, which the server inherits (put secrets such as HF_TOKEN there, not
    # here); TRL's weight-sync endpoints need vLLM's dev mode
    env: dict[str, str] = {"VLLM_SERVER_DEV_MODE": "1"}

    @model_validator(mode="after")
    def _gpus(self) -> VllmServerCfg:
        if not re.fullmatch(r"(\d+(,\d+)*)?", self.gpus.replace(" ", "")):
            raise ValueError(f"vllm_server.gpus: '{self.gpus}' is not a list of GPU indices such as \"7\" or \"6,7\"")
        n = len(self.gpu_ids())
        if n and n < self.tensor_parallel_size:
            raise ValueError(f"vllm_server.tensor_parallel_size ({self.tensor_parallel_size}) needs that many GPUs; "
                             f"vllm_server.gpus lists {n}")
        return self

    def gpu_ids(self) -> list[int]:
        return [int(g) for g in self.gpus.replace(" ", "").split(",") if g]

    def base_url(self) -> str:
        """http://host:port (a server bound to 0.0.0.0 is reached as 127.0.0.1)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"


class PipelineCfg(Section):
    retrain_cron: str = "0 3 * * 0"  # scheduled retraining (Prefect deployment), weekly by default
    retries: int = Field(1, ge=0)


class Params(Section):
    seed: int = 0
    policy: PolicyCfg = PolicyCfg()
    tracking: TrackingCfg = TrackingCfg()
    agent: AgentCfg = AgentCfg()
    prepare: PrepareCfg = PrepareCfg()
    index: IndexCfg = IndexCfg()
    retrieval: RetrievalCfg = RetrievalCfg()
    sample: SampleCfg = SampleCfg()
    sft: SftCfg = SftCfg()
    rl: RlCfg = RlCfg()
    # named overlays on `rl` (deep-merged), each trained by the rl_ablation DVC stage into <rl.out_dir>_<name>
    rl_ablations: dict[str, dict[str, Any]] = {}
    evaluate: EvaluateCfg = EvaluateCfg()
    launcher: LauncherCfg = LauncherCfg()
    vllm_server: VllmServerCfg = VllmServerCfg()
    pipeline: PipelineCfg = PipelineCfg()

    def rl_config(self, ablation: str | None = None) -> RlCfg:
        """The effective RlCfg of the main run (None) or of `rl_ablations[ablation]`, with its own
        out_dir (<rl.out_dir>_<name>); a bad overlay raises ValueError naming the key."""
        if ablation is None:
            return self._with_init(self.rl)
        if ablation not in self.rl_ablations:
            known = ", ".join(self.rl_ablations) or "none"
            raise ValueError(f"rl_ablations: no ablation named '{ablation}' (known: {known})")
        overlay = self.rl_ablations[ablation]
        fixed = sorted(set(overlay) & {"out_dir", "checkpoint_dir", "metrics_dir"})
        if fixed:
            raise ValueError(f"'{fixed[0]}' is derived from the rl section, not set per ablation")
        merged = deep_merge(self.rl.model_dump(mode="json"), overlay)
        merged["out_dir"] = f"{self.rl.out_dir}_{ablation}"
        try:
            return self._with_init(RlCfg.model_validate(merged))
        except ValidationError as err:
            raise ValueError(_format_error(err, "", root=RlCfg).removeprefix(": ")) from None

    def _with_init(self, cfg: RlCfg) -> RlCfg:
        """`init: policy` starts RL from policy.model (R1-Searcher's recipe has no SFT)."""
        return cfg.model_copy(update={"init": self.policy.model}) if cfg.init == "policy" else cfg

    @model_validator(mode="after")
    def _check_rl(self) -> Params:
        for name in self.rl_ablations:
            if not re.fullmatch(r"[A-Za-z0-9_]+", name):
                raise ValueError(f"rl_ablations: name '{name}' must be letters, digits and '_' (it names a "
                                 f"DVC stage and a model directory)")
            try:
                self.rl_config(name)
            except ValueError as err:
                raise ValueError(f"rl_ablations.{name}: {err}") from None
        for method in self.evaluate.methods:
            if method not in EVAL_METHODS and method.removeprefix("rl_") not in self.rl_ablations:
                known = [*EVAL_METHODS, *(f"rl_{name}" for name in self.rl_ablations)]
                close = difflib.get_close_matches(method, known, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise ValueError(f"evaluate.methods: unknown method '{method}' (known: "
                                 f"{', '.join(EVAL_METHODS)}, or rl_<name> for a name in rl_ablations){hint}")
        for a, b in self.evaluate.compare:
            for m in (a, b):
                if m not in self.evaluate.methods:
                    raise ValueError(f"evaluate.compare: '{m}' in [{a}, {b}] is not in evaluate.methods "
                                     f"({', '.join(self.evaluate.methods)})")
        return self

    @model_validator(mode="after")
    def _check_launcher(self) -> Params:
        """Under several processes every rank must get whole RL groups and equal SFT micro-batches."""
        n = self.launcher.processes * self.launcher.machines
        if n == 1:
            return self
        if self.sft.batch_size % (self.sft.micro_batch_size * n):
            raise ValueError(f"sft.batch_size ({self.sft.batch_size}) must be a multiple of sft.micro_batch_size x "
                             f"processes ({self.sft.micro_batch_size} x {n}) under launcher.processes")
        for name in [None, *self.rl_ablations]:
            cfg = self.rl_config(name)
            where = "rl" if name is None else f"rl_ablations.{name}"
            if cfg.prompts_per_step % n:
                raise ValueError(f"{where}.prompts_per_step ({cfg.prompts_per_step}) must be a multiple of the "
                                 f"{n} training processes (each rank rolls out whole groups)")
            local = cfg.prompts_per_step // n * cfg.num_generations
            if local % cfg.micro_batch_size:
                raise ValueError(f"{where}.micro_batch_size ({cfg.micro_batch_size}) must divide each rank's "
                                 f"{local} rollouts (prompts_per_step / processes x num_generations)")
        return self

    @model_validator(mode="after")
    def _check_vllm_server(self) -> Params:
        """A flow-managed server serves the RL runs in server mode: their base URL is the server's, and
        it must not sit on a training GPU (accelerate puts rank r on cuda:r)."""
        srv = self.vllm_server
        if not srv.managed:
            return self
        runs = [None, *self.rl_ablations]
        try:
            served = [n for n in runs if (c := self.rl_config(n)).use_vllm and c.vllm_mode == "server"]
        except ValueError:
            return self  # a bad overlay is reported by _check_rl
        if not served:
            raise ValueError("vllm_server.managed: no RL run uses a vLLM server (set rl.use_vllm: true and "
                             "rl.vllm_mode: server, or managed: false)")
        url = srv.base_url()
        if self.rl.vllm_server_base_url not in (None, "", url):
            raise ValueError(f"rl.vllm_server_base_url ({self.rl.vllm_server_base_url}) is not the managed server's "
                             f"{url} (vllm_server.host / port): leave it unset, or set vllm_server.managed: false")
        self.rl.vllm_server_base_url = url
        training = set(range(self.launcher.processes))
        clash = sorted(set(srv.gpu_ids()) & training) if self.policy.device != "cpu" else []
        if clash:
            raise ValueError(f"vllm_server.gpus: GPU {clash[0]} also runs a training process (launcher.processes: "
                             f"{self.launcher.processes} use GPUs 0-{self.launcher.processes - 1}); give the server "
                             f"the GPUs after them, e.g. \"{self.launcher.processes}\"")
        return self

    @model_validator(mode="after")
    def _check_retrieval_service(self) -> Params:
        """A flow-managed retrieval server is the run's retrieval.url (as vllm_server for the policy)."""
        srv = self.retrieval.serve
        if not srv.managed:
            return self
        url = srv.base_url()
        if self.retrieval.url not in ("", url, url + "/"):
            raise ValueError(f"retrieval.url ({self.retrieval.url}) is not the managed server's {url} "
                             "(retrieval.serve.host / port): leave it empty, or set retrieval.serve.managed: false")
        if self.retrieval.api != "searchrl":
            raise ValueError("retrieval.api: the managed server is searchrl's own; use api: searchrl with "
                             "retrieval.serve.managed (search_r1 is for someone else's server at retrieval.url)")
        self.retrieval.url = url
        return self

    @model_validator(mode="after")
    def _check_input_files(self) -> Params:
        if self.prepare.source == "jsonl":
            specs = self.prepare.jsonl.train + self.prepare.jsonl.eval + self.prepare.jsonl.corpus
            for group, spec_list in (("train", self.prepare.jsonl.train), ("eval", self.prepare.jsonl.eval),
                                     ("corpus", self.prepare.jsonl.corpus)):
                for i, spec in enumerate(spec_list):
                    if not resolve_input(spec.path).exists():
                        raise ValueError(f"prepare.jsonl.{group}[{i}].path: file not found: {spec.path}")
            if not specs:
                raise ValueError("prepare.jsonl: no files listed (set train/eval/corpus)")
        if self.prepare.source == "hf":
            if not self.prepare.hf.datasets:
                raise ValueError("prepare.hf.datasets: no datasets listed (e.g. - {name: hotpotqa})")
            for i, spec in enumerate(self.prepare.hf.corpus):
                if not resolve_input(spec.path).exists():
                    raise ValueError(f"prepare.hf.corpus[{i}].path: file not found: {spec.path}")
        return self

    @model_validator(mode="after")
    def _check_oracle_evidence(self) -> Params:
        """An oracle sampler or rewriter needs gold evidence in the training data, a teacher rewriter a
        teacher model: a setting that cannot work fails here, before any stage runs."""
        users: list[str] = ["sample.sampler"] if "oracle" in self.sample.sampler else []
        for name in (None, *self.rl_ablations):
            try:
                cfg = self.rl_config(name)
            except ValueError:
                continue  # a bad overlay is reported by _check_rl
            if not (cfg.memorization and any(p.reward.kind == "r1searcher_pp" for p in cfg.run_phases())):
                continue  # no memorization, or only R1-Searcher phases (which do not rewrite)
            key = f"rl_ablations.{name}.rewriter" if name and "rewriter" in self.rl_ablations[name] else "rl.rewriter"
            if cfg.rewriter == "teacher" and not self.sample.teacher_model:
                raise ValueError(f"{key}: 'teacher' needs sample.teacher_model (the sample stage's teacher: a local "
                                 "dir, hub id, vllm:<id> or http(s)://host/v1) — or use policy")
            if cfg.rewriter == "oracle" and key not in users:
                users.append(key)
        gap = missing_evidence(self.prepare) if users else None
        if gap:
            raise ValueError(f"{users[0]}: 'oracle' needs gold evidence (Knowledge World hop chains or HotpotQA/2Wiki/"
                             f"MuSiQue supporting facts); {gap} — use policy or teacher")
        return self


def missing_evidence(prepare: PrepareCfg) -> str | None:
    """None when the training data carries gold evidence for the oracle sampler / rewriter (the
    Knowledge World's hop chains, or a train input whose format is in formats.EVIDENCE_FORMATS; an hf
    dataset by its name's format); else what the source is, for the error line. Inputs it cannot judge
    (a missing file, an `auto` file that cannot be sniffed, no train inputs) are left to other checks."""
    from searchrl.data import formats, hf
    from searchrl.errors import InputError

    if prepare.source == "knowledge_world":
        return None
    if prepare.source == "hf":
        names = [d.name for d in prepare.hf.datasets if d.role == "train"]
        if not names or any(hf.DEFAULTS[n].format in formats.EVIDENCE_FORMATS for n in names):
            return None
        return f"prepare.source hf with dataset {', '.join(dict.fromkeys(names))} has none"
    found = []
    for spec in prepare.jsonl.train:
        fmt = spec.format
        if fmt == "auto":
            try:
                fmt = formats.detect_format(resolve_input(spec.path))
            except InputError:
                return None
        if fmt in formats.EVIDENCE_FORMATS:
            return None
        found.append(fmt)
    return f"prepare.source jsonl with format {', '.join(dict.fromkeys(found))} has none" if found else None


# ----------------------------------------------------------------------------- loading
def project_root() -> Path:
    """The repository root: SEARCHRL_ROOT, else the nearest parent holding pyproject.toml."""
    if env := os.environ.get("SEARCHRL_ROOT"):
        return Path(env).resolve()
    here = Path.cwd().resolve()
    for d in (here, *here.parents):
        if (d / "pyproject.toml").exists() and (d / "searchrl").is_dir():
            return d
    return Path(__file__).resolve().parent.parent


def resolve_input(path: str) -> Path:
    """Inputs outside the pipeline are relative to the project root (works from runs/<preset>/)."""
    p = Path(os.path.expandvars(os.path.expanduser(path)))
    return p if p.is_absolute() else project_root() / p


def deep_merge(base: dict, overlay: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in overlay.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    """'a.b.c=value' -> (['a','b','c'], yaml-parsed value); ConfigError (one line, with a corrected
    value where closing brackets or quotes make it parse) for a malformed key or value."""
    if "=" not in item:
        raise ConfigError(f"override '{item}': expected KEY=VALUE, e.g. evaluate.top_k=5")
    key, value = item.split("=", 1)
    keys = key.strip().split(".")
    if not all(keys):
        raise ConfigError(f"override '{item}': key '{key.strip()}' has an empty part (expected e.g. "
                          "evaluate.top_k=5)")
    try:
        return keys, yaml.safe_load(value)
    except yaml.YAMLError as err:
        why = getattr(err, "problem", None) or str(err).splitlines()[0]
        fix = _yaml_fix(value)
        hint = f"; did you mean '{key.strip()}={fix}'?" if fix else " (quote it to pass it as text)"
        raise ConfigError(f"override '{item}': the value '{value}' of '{key.strip()}' is not valid YAML "
                          f"({why}){hint}") from None


def _yaml_fix(value: str) -> str | None:
    """The value with its unclosed brackets / braces closed, or quoted, if that parses as YAML."""
    closers = []
    for ch in value:
        if ch in "[{":
            closers.append("]" if ch == "[" else "}")
        elif ch in "]}" and closers and closers[-1] == ch:
            closers.pop()
    quoted = "'" + value.replace("'", "''") + "'"
    for candidate in (value + "".join(reversed(closers)), quoted):
        try:
            yaml.safe_load(candidate)
        except yaml.YAMLError:
            continue
        return candidate
    return None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    raw = copy.deepcopy(raw)
    for item in overrides:
        keys, value = parse_override(item)
        node = raw
        for i, k in enumerate(keys[:-1]):
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{'.'.join(keys[:i + 1])}' is not a section")
        node[keys[-1]] = value
    return raw


def _model_for_path(loc: tuple, root: type[BaseModel] | None = None) -> type[BaseModel] | None:
    model: type[BaseModel] | None = root or Params
    for part in loc:
        if model is None or isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        ann = field.annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if model is None:  # list[FileSpec] and similar
            for arg in getattr(ann, "__args__", ()):
                if isinstance(arg, type) and issubclass(arg, BaseModel):
                    model = arg
    return model


def _format_error(err: ValidationError, source: str, root: type[BaseModel] | None = None) -> str:
    e = err.errors()[0]
    loc = tuple(e["loc"])
    dotted = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in loc).replace(".[", "[")
    if e["type"] == "extra_forbidden":
        parent = _model_for_path(loc[:-1], root)
        hint = ""
        if parent is not None:
            close = difflib.get_close_matches(str(loc[-1]), list(parent.model_fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known keys: {', '.join(parent.model_fields)})"
        return f"{source}: unknown key '{dotted}'{hint}"
    if e["type"] == "value_error":
        msg = e["msg"].removeprefix("Value error, ")
        # a field validator's message lacks the key (a model validator's names it itself)
        leaf = bool(loc) and not isinstance(loc[-1], int) and _model_for_path(loc, root) is None
        return f"{source}: '{dotted}': {msg}" if leaf else f"{source}: {msg}"
    got = e.get("input")
    if e["type"] == "literal_error":  # a misspelt choice: name the closest one
        choices = re.findall(r"'([^']*)'", str(e.get("ctx", {}).get("expected", "")))
        close = difflib.get_close_matches(str(got), choices, n=1, cutoff=0.5)
        if close:
            return f"{source}: '{dotted}': {e['msg']} (got {got!r}; did you mean '{close[0]}'?)"
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{source}: '{dotted}': {e['msg']} (got {got!r}){more}"


def shown_path(path: str | os.PathLike) -> str:
    """A path as a message names it: relative to the current directory when it lies below it."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


def load_yaml(path: str | os.PathLike) -> dict:
    """A YAML mapping; ConfigError with one line `<file>[:line:column]: ...` when it is missing, not YAML
    (PyYAML's problem and its position, 1-based) or not a mapping."""
    p, shown = Path(path), shown_path(path)
    if not p.exists():
        raise ConfigError(f"{shown}: file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{shown}:{mark.line + 1}:{mark.column + 1}" if mark is not None else shown
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{where}: not valid YAML: {problem}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{shown}: expected a mapping at the top level")
    return data


def load_raw(path: str | os.PathLike = "params.yaml", preset: str | os.PathLike | None = None,
             overrides: list[str] | None = None) -> dict:
    raw = load_yaml(path)
    if preset:
        raw = deep_merge(raw, load_yaml(preset))
    return apply_overrides(raw, overrides or [])


def validate(raw: dict, source: str = "params.yaml") -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None


def load_params(path: str | os.PathLike = "params.yaml", preset: str | os.PathLike | None = None,
                overrides: list[str] | None = None) -> Params:
    """Load, merge and validate; raises ConfigError with a one-line message."""
    source = str(path) if not preset else f"{path} + {preset}"
    return validate(load_raw(path, preset, overrides), source)
