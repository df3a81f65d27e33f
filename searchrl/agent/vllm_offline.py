"""VLLMBackend: offline `vllm.LLM` over token prompts (GPU machines only; `import vllm` happens only
inside it). The HTTP client of a `trl vllm-serve` server is searchrl/agent/vllm_server.py.

vLLM's own `.text` is cut at the stop string; ours is the decode of the sampled ids (without a final
EOS), as for every backend (searchrl/agent/generation.py).
"""

from __future__ import annotations

from searchrl.agent.generation import Generation
from searchrl.agent.tokens import decode, eos_token_ids


class VLLMBackend:
    """Offline vLLM (0.3x, V1 engine) over token prompts. GPU machines only.

    Logprobs are requested with `logprobs=0` (the sampled token only) from an engine built with
    `logprobs_mode="processed_logprobs"`, i.e. after temperature / top-p, the distribution actually
    sampled from (as TRL does). Automatic prefix caching (on by default) makes the engine's
    `prompt + completion so far` re-submission each turn cheap.
    """

    def __init__(self, model_path: str, dtype: str = "auto", gpu_memory_utilization: float = 0.85,
                 seed: int = 0, max_model_len: int | None = None, llm=None, tokenizer=None):
        if llm is None:
            try:
                from vllm import LLM
            except ImportError as err:
                from searchrl.errors import SearchRLError

                raise SearchRLError(
                    "agent.backend=vllm needs vLLM, which is not installed here (GPU machines only: "
                    "pip install 'searchrl[gpu]'). On CPU set agent.backend=hf.") from err
            llm = LLM(model=model_path, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization, seed=seed,
                      max_model_len=max_model_len, logprobs_mode="processed_logprobs")
        self.llm = llm
        self.tokenizer = tokenizer if tokenizer is not None else llm.get_tokenizer()
        self.eos_ids = eos_token_ids(self.tokenizer)

    def generate(self, prompts: list[list[int]], *, max_new_tokens: int | list[int], stop: list[str] = (),
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> list[Generation]:
        from vllm import SamplingParams

        n = len(prompts)
        budgets = [int(max_new_tokens)] * n if isinstance(max_new_tokens, int) else [int(m) for m in max_new_tokens]
        params = [SamplingParams(max_tokens=max(1, b), temperature=float(temperature),
                                 top_p=float(top_p) if temperature > 0 else 1.0,
                                 seed=None if seed is None else int(seed) + i, stop=list(stop) or None,
                                 stop_token_ids=sorted(self.eos_ids), include_stop_str_in_output=True,
                                 logprobs=0, skip_special_tokens=False, detokenize=True)
                  for i, b in enumerate(budgets)]
        outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        res = []
        for p_out, b in zip(outs, budgets, strict=True):
            o = p_out.outputs[0]
            ids = list(o.token_ids)
            lps = [float(d[t].logprob) if d is not None and t in d else 0.0
                   for t, d in zip(ids, o.logprobs or [None] * len(ids), strict=False)]
            if b <= 0:
                ids, lps = [], []
            if o.finish_reason == "length" or b <= 0:
                finish, which = "length", None
            elif isinstance(o.stop_reason, str):
                finish, which = "stop", o.stop_reason
            else:  # EOS or a stop token id
                finish, which = "eos", None
            ends_eos = bool(ids) and ids[-1] in self.eos_ids
            text_ids = ids[:-1] if finish == "eos" and ends_eos else ids
            res.append(Generation(ids, decode(self.tokenizer, text_ids), lps, finish, which))
        return res
