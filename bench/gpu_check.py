"""GPU check: the HF rollout engine vs transformers' own `generate` on random-init models of real
shapes (no downloads), and a few steps of the RL stage on the same device.

    python bench/gpu_check.py                              # CUDA: 135m, 1.5b and 7b shapes, 128 rollouts
    python bench/gpu_check.py --shapes 7b --name h200_7b   # -> bench/results/gpu_h200_7b.json
    python bench/gpu_check.py --tiny --device cpu          # smoke run on a CPU (tests/unit/test_gpu_check.py)

For each shape (configs written below: SmolLM2-135M, Qwen2.5-1.5B, Qwen2.5-7B; bf16 on CUDA, float32
on CPU) a randomly initialised model gets the same batch from every path: `--rollouts` R1-Searcher++
prompts (the real SmolLM2 tokenizer and chat template, ~220 tokens each; the vocabularies of the
larger shapes are bigger, so every token id fits), greedy, `--new-tokens` per row, EOS suppressed so
that rows end on the cap:
- engine:            HFBackend.generate with the protocol's stop strings (its default decode mode:
                     static shapes + CUDA graphs on CUDA), all rows in one batch;
- engine_static:     decode_mode="static" (what engine is on CUDA; on a CPU the same shapes, eagerly);
- engine_dynamic:    the same with decode_mode="dynamic" (no graphs), for comparison;
- generate_dynamic:  model.generate, left-padded batch, DynamicCache;
- generate_static:   model.generate with cache_implementation="static" (transformers compiles the
                     decode step with torch.compile "reduce-overhead" on CUDA; not on CPU).
Each path runs once to warm up (kernels, compilation, graph capture) and is then timed. Reported:
generated tokens/s, the fraction of the weight-bandwidth ceiling (one decode step has to read every
weight once: ceiling = bandwidth / weight bytes per step x rows; the input embedding is left out of
the bytes, only the rows of the batch's tokens are read; bandwidth from --bandwidth, else the GPU's
spec sheet, else a measured device copy), peak memory, and how many rows give the same tokens as
generate_dynamic (bf16 rows may differ after a near-tie; in float32 on CPU they all agree).

Then `--rl-steps` steps of the RL stage (searchrl.training.rl.train_rl) on a tiny workspace (4
questions, 4 passages, keyword retriever) with the smallest shape of the run, on the same device.
Results: bench/results/gpu_<name>.json (default name: device + UTC time), or --out.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import shlex
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name -> (model type, config). Real shapes; weights are random.
SHAPES = {
    "135m": ("llama", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                           num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
                           rms_norm_eps=1e-5, max_position_embeddings=8192)),  # SmolLM2-135M
    "1.5b": ("qwen2", dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                           num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6,
                           rms_norm_eps=1e-6, max_position_embeddings=32768)),  # Qwen2.5-1.5B
    "7b": ("qwen2", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False, rope_theta=1e6,
                         rms_norm_eps=1e-6, max_position_embeddings=32768)),  # Qwen2.5-7B
    "tiny": ("llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=49152, tie_word_embeddings=True,
                           max_position_embeddings=2048)),
}
# HBM bandwidth from the vendors' spec sheets (bytes/s), matched against torch.cuda.get_device_name().
SPEC_BANDWIDTH = [("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100 NVL", 3.9e12), ("H100", 3.35e12),
                  ("A100-SXM4-80GB", 2.039e12), ("A100 80GB PCIe", 1.935e12), ("A100", 1.555e12)]
PATHS = ("engine", "engine_static", "engine_dynamic", "generate_dynamic", "generate_static")
ENGINE_MODES = {"engine": "auto", "engine_static": "static", "engine_dynamic": "dynamic"}


def build_model(shape: str, tok, dtype, device):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    kind, kw = SHAPES[shape]
    cls = LlamaConfig if kind == "llama" else Qwen2Config
    kw = {**kw, "vocab_size": max(kw["vocab_size"], len(tok))}
    config = cls(**kw, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def prompts_for(tok, n: int) -> list[list[int]]:
    from searchrl.agent.protocols import get_protocol

    proto = get_protocol("r1searcher_pp")
    subjects = ["Talo Vesk", "Mira Sol", "Bantex Labs", "Zorvath Inc", "Quell Ardent", "the Orin Bridge"]
    relations = ["In which country was {} born?", "Who founded {}?", "When was {} built?",
                 "Which company does {} work for?"]
    return [proto.prompt_ids(tok, relations[i % len(relations)].format(f"{subjects[i % len(subjects)]} {i}"))[1]
            for i in range(n)]


def weight_bytes(model) -> int:
    """Bytes one decode step must read: every parameter once, except the input embedding (only the
    batch's rows of it are gathered) unless it is tied to the output layer."""
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    tied = out is not None and out.weight.data_ptr() == emb.data_ptr()
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total if tied else total - emb.numel() * emb.element_size()


def bandwidth(device, override: float | None) -> tuple[float | None, str]:
    import torch

    if override:
        return override * 1e9, "--bandwidth"
    if device.type != "cuda":
        return None, "none (not a GPU)"
    name = torch.cuda.get_device_name(device)
    for key, bw in SPEC_BANDWIDTH:
        if key in name:
            return bw, f"spec sheet ({key})"
    x = torch.empty(1 << 29, dtype=torch.uint8, device=device)  # 512 MiB
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize(device)
    return 2 * 10 * x.numel() / (time.perf_counter() - t0), f"measured device copy ({name})"


class Meter:
    """Wall time (synchronised on CUDA) and peak memory of one block."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
            self.peak_kind = "torch.cuda.max_memory_allocated"
        else:
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.peak_kind = "process max RSS"
        self.seconds = time.perf_counter() - self.t0


def run_engine(model, tok, prompts, new_tokens: int, mode: str):
    from searchrl.agent.hf_backend import HFBackend
    from searchrl.agent.protocols import get_protocol

    backend = HFBackend(model, tok, batch_size=len(prompts), decode_mode=mode)
    backend.eos_ids = set()  # EOS suppressed: rows end on the cap (an EOS token is just a token)
    stops = get_protocol("r1searcher_pp").stops
    gens = backend.generate(prompts, max_new_tokens=new_tokens, stop=stops)
    return [g.token_ids for g in gens], {k: backend.stats[k] for k in ("decode_steps", "graph_captures")}


def run_generate(model, tok, prompts, new_tokens: int, static: bool):
    import torch
    from transformers import GenerationConfig

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), tok.pad_token_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for j, p in enumerate(prompts):
        ids[j, width - len(p):] = torch.tensor(p)
        attn[j, width - len(p):] = 1
    cfg = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                           cache_implementation="static" if static else None)
    with torch.inference_mode():
        out = model.generate(input_ids=ids.to(model.device), attention_mask=attn.to(model.device),
                             generation_config=cfg)
    return [row[width:].tolist() for row in out], {}


def measure_shape(shape: str, args, tok, device, dtype, bw) -> dict:

    model = build_model(shape, tok, dtype, device)
    prompts = prompts_for(tok, args.rollouts)
    wbytes = weight_bytes(model)
    res = {"shape": shape, "params": sum(p.numel() for p in model.parameters()), "weight_bytes_per_step": wbytes,
           "rows": len(prompts), "prompt_tokens_mean": round(sum(map(len, prompts)) / len(prompts), 1),
           "new_tokens": args.new_tokens, "paths": {}}
    if bw:
        res["ceiling_tokens_per_s"] = round(bw / wbytes * len(prompts), 1)
    ref = None
    for path in args.paths:
        def once(path=path, model=model):
            if path.startswith("engine"):
                return run_engine(model, tok, prompts, args.new_tokens, ENGINE_MODES[path])
            return run_generate(model, tok, prompts, args.new_tokens, static=path == "generate_static")

        try:
            with Meter(device) as warm:
                once()
            with Meter(device) as m:
                toks, extra = once()
        except Exception as err:  # one path failing (e.g. torch.compile on an odd stack) is a result too
            res["paths"][path] = {"error": f"{type(err).__name__}: {err}"[:500]}
            print(f"  {shape} {path}: FAILED {type(err).__name__}: {err}", flush=True)
            continue
        n = sum(len(t) for t in toks)
        entry = {"tokens": n, "seconds": round(m.seconds, 3), "warmup_seconds": round(warm.seconds, 3),
                 "tokens_per_s": round(n / m.seconds, 1), "peak_memory_gb": round(m.peak / 1e9, 3),
                 "peak_memory_kind": m.peak_kind, **extra}
        if bw:
            entry["fraction_of_ceiling"] = round(entry["tokens_per_s"] / res["ceiling_tokens_per_s"], 4)
        if path == "generate_dynamic":
            ref = toks
        entry["_tokens"] = toks
        res["paths"][path] = entry
        print(f"  {shape} {path}: {entry['tokens_per_s']} tokens/s"
              + (f" ({100 * entry['fraction_of_ceiling']:.1f}% of ceiling)" if bw else "")
              + f", peak {entry['peak_memory_gb']} GB", flush=True)
    for entry in res["paths"].values():
        toks = entry.pop("_tokens", None)
        if ref is not None and toks is not None:
            entry["rows_equal_to_generate_dynamic"] = sum(a == b for a, b in zip(toks, ref, strict=True))
    ok = {p: e["tokens_per_s"] for p, e in res["paths"].items() if "tokens_per_s" in e}
    best_generate = max((v for p, v in ok.items() if p.startswith("generate")), default=None)
    if "engine" in ok and best_generate:
        res["engine_vs_best_generate"] = round(ok["engine"] / best_generate, 3)
    return res


def rl_steps(shape: str, steps: int, tok, device) -> dict:
    """`steps` steps of train_rl on a 4-question workspace, the policy a random-init `shape` model."""
    import torch

    from searchrl.agent.fakes import KeywordRetriever
    from searchrl.config import validate
    from searchrl.data.schema import QARecord, qa_frame
    from searchrl.training import rl as RL

    hops = [{"subject": "Talo Vesk", "relation": "born_in", "object": "Peru", "source": "external", "passage_id": "p1"}]
    records = [QARecord("q1", "kw", "train", "In which country was Talo Vesk born?", ["Peru"], {"hops": hops}),
               QARecord("q2", "kw", "train", "Which company does Mira Sol work for?", ["Bantex Labs"], {}),
               QARecord("q3", "kw", "train", "What is the capital of France?", ["Paris"], {}),
               QARecord("q4", "kw", "train", "When was Bantex Labs founded?", ["1987"], {})]
    passages = [("p1", "Talo Vesk", "Talo Vesk is a chemist who was born in Peru."),
                ("p2", "Mira Sol", "Mira Sol works for Bantex Labs."),
                ("p3", "France", "France is a country in Europe. Its capital city is Paris."),
                ("p4", "Bantex Labs", "Bantex Labs was founded in 1987.")]
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_rl_"))
    model = build_model(shape, tok, torch.float32, "cpu")
    model.save_pretrained(tmp / "init")
    tok.save_pretrained(tmp / "init")
    del model
    (tmp / "prepared").mkdir()
    qa_frame(records).to_parquet(tmp / "prepared" / "train.parquet")
    params = validate({
        "seed": 0,
        "policy": {"device": str(device)},
        "agent": {"max_segment_tokens": 16, "max_total_tokens": 48, "batch_size": 8, "max_retrievals": 2},
        "prepare": {"out_dir": str(tmp / "prepared")},
        "rl": {"init": str(tmp / "init"), "max_steps": steps, "num_generations": 2, "prompts_per_step": 2,
               "micro_batch_size": 2, "difficulty": [], "save_steps": steps, "beta": 0.1, "lr": 1e-5,
               "out_dir": str(tmp / "models" / "rl"), "metrics_dir": str(tmp / "reports"),
               "checkpoint_dir": str(tmp / "ckpt")},
    })
    logged: list = []
    try:
        with Meter(device) as m:
            metrics = RL.train_rl(params, retriever=KeywordRetriever(passages),
                                  mlflow_log=lambda row, step: logged.append(step))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"shape": shape, "steps": metrics.get("steps"), "logged_steps": logged, "seconds": round(m.seconds, 2),
            "peak_memory_gb": round(m.peak / 1e9, 3), "peak_memory_kind": m.peak_kind,
            "steps_per_hour": metrics.get("steps_per_hour")}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default=None, help="cuda | cuda:N | cpu (default: cuda when available)")
    ap.add_argument("--tiny", action="store_true", help="tiny shape, 8 rollouts x 8 tokens, 1 RL step (CPU smoke run)")
    ap.add_argument("--shapes", default=None, help="comma list of " + ", ".join(SHAPES) + " (default 135m,1.5b,7b)")
    ap.add_argument("--rollouts", type=int, default=None, help="rows in the batch (default 128; --tiny 8)")
    ap.add_argument("--new-tokens", type=int, default=None, help="tokens per row (default 128; --tiny 8)")
    ap.add_argument("--paths", default=None, help="comma list of " + ", ".join(PATHS) + " (default: all but "
                    "engine_static, which is what engine runs on CUDA; --tiny: all)")
    ap.add_argument("--rl-steps", type=int, default=None, help="RL stage steps (default 2; --tiny 1; 0 = skip)")
    ap.add_argument("--bandwidth", type=float, default=None, help="memory bandwidth in GB/s (default: spec sheet)")
    ap.add_argument("--name", default=None, help="results go to bench/results/gpu_<name>.json")
    ap.add_argument("--out", default=None, help="results file (overrides --name)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    import torch

    from searchrl.models import load_tokenizer

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: --device cuda but torch sees no CUDA device (use --device cpu for the smoke run)")
    shapes = (args.shapes or ("tiny" if args.tiny else "135m,1.5b,7b")).split(",")
    bad = [s for s in shapes if s not in SHAPES]
    paths = (args.paths or ",".join(p for p in PATHS if args.tiny or p != "engine_static")).split(",")
    bad += [p for p in paths if p not in PATHS]
    if bad:
        sys.exit(f"gpu_check: unknown shape or path {', '.join(bad)}")
    args.paths = paths
    args.rollouts = args.rollouts or (8 if args.tiny else 128)
    args.new_tokens = args.new_tokens or (8 if args.tiny else 128)
    rl_n = args.rl_steps if args.rl_steps is not None else (1 if args.tiny else 2)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tok = load_tokenizer("smollm2-135m-instruct")
    bw, bw_source = bandwidth(device, args.bandwidth)
    name = args.name or f"{device.type}_{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}"
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"gpu_{name}.json"
    result = {
        "bench": "gpu_check",
        "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT), *(argv or sys.argv[1:])]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "transformers": __import__("transformers").__version__, "device": str(device),
                    "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
                    "cuda": torch.version.cuda, "load_avg_1m": round(os.getloadavg()[0], 2)},
        "setup": {"dtype": str(dtype).removeprefix("torch."), "greedy": True, "eos_suppressed": True,
                  "rollouts": args.rollouts, "new_tokens": args.new_tokens, "prompts": "R1-Searcher++ prompts, SmolLM2 tokenizer",
                  "bandwidth_bytes_per_s": bw, "bandwidth_source": bw_source},
        "shapes": [],
    }
    for shape in shapes:
        print(f"shape {shape} on {device} ({result['setup']['dtype']})", flush=True)
        result["shapes"].append(measure_shape(shape, args, tok, device, dtype, bw))
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the shape's model is gone: give its memory back before the next one
    if rl_n > 0:
        print(f"RL stage: {rl_n} step(s) with the {shapes[0]} shape", flush=True)
        try:
            result["rl"] = rl_steps(shapes[0], rl_n, tok, device)
        except Exception as err:
            result["rl"] = {"error": f"{type(err).__name__}: {err}"[:500]}
        print(f"  {result['rl']}", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {out}")
    return result


if __name__ == "__main__":
    main()
