"""The retriever every stage uses: the index behind the SQLite cache, behind bounded retries.

    open_retriever(params)  ->  RetryingRetriever(CachedRetriever.for_index(index.out_dir, agent.cache_path))

The index (and its encoder) is loaded only on the first cache miss. Stages call this one function, so
whatever stands behind the cache, every rollout gets the same retry policy (agent.retrieval_retries,
agent.retrieval_backoff_s).
"""

from __future__ import annotations

from searchrl.retrieval.retry import RetryingRetriever


def open_retriever(params, index_dir: str | None = None) -> RetryingRetriever:
    from searchrl.retrieval.cache import CachedRetriever

    index_dir = index_dir or params.index.out_dir
    cached = CachedRetriever.for_index(index_dir, params.agent.cache_path)
    return RetryingRetriever(cached, params.agent.retrieval_retries, params.agent.retrieval_backoff_s,
                             name=str(index_dir))
