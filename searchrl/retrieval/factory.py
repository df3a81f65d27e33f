"""The retriever every stage uses: the index (in process or behind a URL), behind the SQLite cache,
behind bounded retries.

    retrieval.url ""    ->  RetryingRetriever(CachedRetriever.for_index(index.out_dir, agent.cache_path))
    retrieval.url URL   ->  RetryingRetriever(CachedRetriever(HTTPRetriever(URL, retrieval.api), agent.cache_path))

In process, the index (and its encoder) is loaded only on the first cache miss. Through a service,
only the service's manifest hash is fetched at start (under the same retry policy, so a server that
is still starting is waited for); a cache hit never reaches the network. Stages call this one
function, so whatever stands behind the cache, every rollout gets the same retry policy
(agent.retrieval_retries, agent.retrieval_backoff_s) and the RL trainer reads the same `.retries`
counter. A server that stays down fails the stage with one line naming its URL.

The evaluate stage calls `open_eval_retriever`: with `retrieval.backend: web` it searches the web
(searchrl/retrieval/web.py: its own retries, rate limit and replay store instead of the cache); every
other stage keeps the index, which is what the policy is trained on.
"""

from __future__ import annotations

import logging
from pathlib import Path

from searchrl.retrieval.retry import RetryingRetriever

log = logging.getLogger(__name__)


def open_eval_retriever(params):
    """The evaluate stage's retriever: the web (`retrieval.backend: web`) or the same as every stage's."""
    if params.retrieval.backend == "web":
        from searchrl.retrieval.web import open_web_retriever

        return open_web_retriever(params)
    return open_retriever(params)


def open_retriever(params, index_dir: str | None = None) -> RetryingRetriever:
    from searchrl.retrieval.cache import CachedRetriever

    agent = params.agent
    if params.retrieval.url:
        return open_service(params)
    index_dir = index_dir or params.index.out_dir
    cached = CachedRetriever.for_index(index_dir, agent.cache_path)
    return RetryingRetriever(cached, agent.retrieval_retries, agent.retrieval_backoff_s, name=str(index_dir))


def open_service(params) -> RetryingRetriever:
    """The retrieval service at params.retrieval.url behind the cache and the retry policy."""
    from searchrl.retrieval.cache import CachedRetriever
    from searchrl.retrieval.http import HTTPRetriever

    cfg, agent = params.retrieval, params.agent
    client = HTTPRetriever(cfg.url, api=cfg.api, timeout_s=cfg.timeout_s, connect_timeout_s=cfg.connect_timeout_s,
                           pool_size=cfg.pool_size)
    outer = RetryingRetriever(None, agent.retrieval_retries, agent.retrieval_backoff_s, name=client.url,
                              kind="retrieval service")
    served = client.identify(outer.call)
    outer.inner = CachedRetriever(client, agent.cache_path)
    log.info("retrieval: service %s (api %s, manifest %s), cache %s", client.url, cfg.api, served, agent.cache_path)
    _compare_with_local_index(params, served)
    return outer


def _compare_with_local_index(params, served: str) -> None:
    """Warn when the service serves another index than index.out_dir (the stages' DVC dependency)."""
    if params.retrieval.api != "searchrl" or not (Path(params.index.out_dir) / "manifest.json").is_file():
        return
    from searchrl.errors import SearchRLError
    from searchrl.retrieval.index import index_manifest_hash

    try:
        local = index_manifest_hash(params.index.out_dir)
    except SearchRLError:
        return
    if local != served:
        log.warning("retrieval: the service at %s serves index %s, but index.out_dir (%s) holds %s: results (and "
                    "DVC's lineage, which tracks index.out_dir) will not match", params.retrieval.url, served,
                    params.index.out_dir, local)
