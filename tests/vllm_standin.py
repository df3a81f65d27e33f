"""A stand-in for vLLM's OpenAI-compatible server, for tests on machines where vLLM cannot run.

    python tests/vllm_standin.py serve MODEL_DIR --host 127.0.0.1 --port 8000 [any vllm serve flags]

It implements the documented HTTP contract that TRL 1.16's `VLLMClient` and
searchrl/agent/vllm_server.py use, with a real transformers model (float32, CPU) generating real tokens:

    GET  /health, GET /v1/models, GET /get_world_size (1),
    GET  /server_info   only with VLLM_SERVER_DEV_MODE=1 in its environment (404 otherwise, as vLLM),
                        the parsed flags plus, under "standin", argv and CUDA_VISIBLE_DEVICES
    POST /v1/completions  prompt: token ids, a list of them, or text; n, max_tokens (default 16),
        temperature (0 = greedy), top_p, seed, stop, stop_token_ids, ignore_eos,
        include_stop_str_in_output, logprobs (k: the sampled token's logprob first, then the top k),
        return_token_ids, return_tokens_as_token_ids, skip_special_tokens; an unknown model is a 404.
    POST /standin/fail  {"status": 500, "count": k}: the next k completion requests answer `status`
                        (a test hook; vLLM has no such endpoint).

Sampling follows vLLM's semantics: logits / temperature, then top-p, and the logprob reported is of
that processed distribution (`--logprobs-mode processed_logprobs`); a request with a seed samples
from its own generator seeded with it (so equal prompts with an equal seed give equal samples);
EOS or a stop token id ends a sequence with the token kept in token_ids (stop_reason: the id for a
stop token id, null for EOS); a stop string is looked for in the text decoded so far, token_ids keep
every token up to the one completing it, and the text is cut after it (include_stop_str_in_output)
or before it. Requests are served one at a time. Unknown flags (--tensor-parallel-size, --dtype,
--weight-transfer-config, ...) are accepted and reported by /server_info.
"""

import argparse
import os
import sys
import threading
import time
import uuid


def build_app(model_dir: str, served_name: str, flags: dict):
    import torch
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    lock = threading.Lock()
    failures = {"status": 500, "count": 0}
    app = FastAPI()

    def error(status: int, message: str, kind: str = "BadRequestError"):
        return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)

    @app.get("/health")
    def health():
        return Response(status_code=200)

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": served_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "vllm", "root": model_dir, "max_model_len": 2048}]}

    @app.get("/get_world_size")
    def world_size():
        return {"world_size": 1}

    @app.get("/server_info")
    def server_info():
        if os.environ.get("VLLM_SERVER_DEV_MODE") != "1":
            return error(404, "Not Found", "NotFoundError")
        return {"vllm_config": {"model_config": {"model": model_dir, "served_model_name": served_name},
                                "parallel_config": {"tensor_parallel_size": int(flags.get("tensor_parallel_size", 1))},
                                "flags": flags},
                "standin": {"argv": sys.argv, "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}}

    @app.post("/standin/fail")
    async def fail(request: Request):
        body = await request.json()
        failures.update(status=int(body.get("status", 500)), count=int(body.get("count", 1)))
        return {"ok": True}

    def sample_one(prompt: list[int], body: dict, gen) -> dict:
        max_tokens = int(body.get("max_tokens") or 16)
        temperature = float(body.get("temperature", 1.0))
        top_p = float(body.get("top_p", 1.0))
        stops = body.get("stop") or []
        stops = [stops] if isinstance(stops, str) else list(stops)
        stop_ids = set(int(i) for i in body.get("stop_token_ids") or [])
        eos = None if body.get("ignore_eos") else tok.eos_token_id
        k = body.get("logprobs")
        ids, lps, tops = [], [], []
        finish, stop_reason, text = "length", None, None
        past, inp = None, torch.tensor([prompt])
        with torch.no_grad():
            for _ in range(max_tokens):
                out = model(input_ids=inp, past_key_values=past, use_cache=True)
                past = out.past_key_values
                logits = out.logits[0, -1].float()
                if temperature > 0:
                    logits = logits / temperature
                    if top_p < 1.0:
                        sorted_logits, order = torch.sort(logits, descending=True)
                        probs = torch.softmax(sorted_logits, -1)
                        cut = torch.cumsum(probs, -1) - probs > top_p
                        sorted_logits[cut] = float("-inf")
                        logits = torch.full_like(logits, float("-inf")).scatter(0, order, sorted_logits)
                    logp = torch.log_softmax(logits, -1)
                    t = int(torch.multinomial(logp.exp(), 1, generator=gen)[0])
                else:
                    logp = torch.log_softmax(logits, -1)
                    t = int(torch.argmax(logits))
                ids.append(t)
                lps.append(max(float(logp[t]), -9999.0))
                if k is not None and int(k) > 0:
                    vals, idx = torch.topk(logp, int(k))
                    tops.append({t: lps[-1], **{int(i): max(float(v), -9999.0) for v, i in zip(vals, idx, strict=True)}})
                else:
                    tops.append({t: lps[-1]})
                inp = torch.tensor([[t]])
                if eos is not None and t == eos:
                    finish = "stop"
                    break
                if t in stop_ids:
                    finish, stop_reason = "stop", t
                    break
                if stops:
                    so_far = tok.decode(ids, skip_special_tokens=False)
                    hits = [(so_far.find(s), s) for s in stops if s and s in so_far]
                    if hits:
                        pos, s = min(hits)
                        finish, stop_reason = "stop", s
                        text = so_far[: pos + len(s)] if body.get("include_stop_str_in_output") else so_far[:pos]
                        break
        if text is None:
            ended_on_token = finish == "stop" and (stop_reason is None or isinstance(stop_reason, int))
            shown = ids[:-1] if ended_on_token else ids
            text = tok.decode(shown, skip_special_tokens=bool(body.get("skip_special_tokens", True)))
        as_ids = bool(body.get("return_tokens_as_token_ids"))

        def name(t: int) -> str:
            return f"token_id:{t}" if as_ids else tok.decode([t])

        logprobs = None
        if k is not None:
            logprobs = {"text_offset": list(range(len(ids))), "token_logprobs": lps, "tokens": [name(t) for t in ids],
                        "top_logprobs": [{name(t): v for t, v in d.items()} for d in tops]}
        choice = {"text": text, "logprobs": logprobs, "finish_reason": finish, "stop_reason": stop_reason}
        if body.get("return_token_ids"):
            choice.update(prompt_token_ids=list(prompt), token_ids=ids)
        return choice

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        if failures["count"] > 0:
            failures["count"] -= 1
            return error(failures["status"], "stand-in: failing on request (POST /standin/fail)", "InternalServerError")
        if body.get("model") not in (None, served_name):
            return error(404, f"The model `{body.get('model')}` does not exist.", "NotFoundError")
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            prompts = [tok.encode(prompt)]
        elif isinstance(prompt, list) and prompt and all(isinstance(x, int) for x in prompt):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(x, str) for x in prompt):
            prompts = [tok.encode(x) for x in prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(x, list) for x in prompt):
            prompts = prompt
        else:
            return error(400, "prompt: expected text, token ids or a list of either")
        n = int(body.get("n") or 1)
        choices = []
        import torch

        with lock:
            for p in prompts:
                gen = torch.Generator()
                seed = body.get("seed")
                gen.manual_seed(int(seed) if seed is not None else int.from_bytes(os.urandom(4), "little"))
                for _ in range(n):  # prompt-major, as vLLM
                    choices.append(sample_one([int(t) for t in p], body, gen))
        for i, c in enumerate(choices):
            c["index"] = i
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": served_name, "choices": choices,
                "usage": {"prompt_tokens": sum(len(p) for p in prompts),
                          "completion_tokens": sum(len(c.get("token_ids") or []) for c in choices)}}

    return app


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "serve":
        argv = argv[1:]
    ap = argparse.ArgumentParser(prog="vllm_standin")
    ap.add_argument("model")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--served-model-name", default=None)
    args, rest = ap.parse_known_args(argv)
    flags = {}
    key = None
    for item in rest:  # --flag value pairs, reported by /server_info
        if item.startswith("--"):
            key = item[2:].replace("-", "_")
            flags[key] = True
        elif key is not None:
            flags[key] = item
            key = None
    import uvicorn

    app = build_app(args.model, args.served_model_name or args.model, flags)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
