"""The `hf` source: HotpotQA, 2WikiMultiHopQA, MuSiQue and Bamboogle through `datasets.load_dataset`.

Rows are mapped with the same field mappers as the `jsonl` formats (searchrl.data.formats.MAPPERS),
chosen from the dataset's column names, so a hub mirror with another layout still maps as long as
its fields are one of the known formats.

`path` may be a hub id (the default per dataset below; needs network or a warm HF cache), a local
directory written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`, or a local directory of data
files (parquet / json / csv) that `load_dataset` reads with its packaged builders.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from searchrl.config import resolve_input
from searchrl.data.formats import QAFile, format_from_keys, map_rows
from searchrl.errors import InputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HubDefault:
    path: str
    config: str | None
    format: str  # mapper used when the columns do not say otherwise


DEFAULTS: dict[str, HubDefault] = {
    "hotpotqa": HubDefault("hotpotqa/hotpot_qa", "distractor", "hotpotqa"),
    "2wikimultihopqa": HubDefault("framolfese/2WikiMultihopQA", None, "hotpotqa"),  # same layout as HotpotQA
    "musique": HubDefault("dgslibisey/MuSiQue", None, "musique"),  # musique_ans_v1.0_{train,dev}.jsonl
    "bamboogle": HubDefault("chiayewken/bamboogle", None, "r1searcher"),  # Question, Answer; split "test"
}


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").exists() or (path / "state.json").exists()


def load_hf_split(path: str, config: str | None, split: str):
    """One split as a `datasets.Dataset`; failures become an InputError naming the dataset and split."""
    import datasets

    source = f"{path}[{split}]"
    local = resolve_input(path)
    try:
        if local.is_dir() and _is_saved_dataset(local):
            ds = datasets.load_from_disk(str(local))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise InputError(source, f"no split '{split}' (available: {', '.join(ds)})",
                                     fix="set split: in prepare.hf.datasets")
                ds = ds[split]
            return ds
        target = str(local) if local.exists() else path
        return datasets.load_dataset(target, config, split=split)
    except InputError:
        raise
    except Exception as err:  # network, unknown split, bad files: one readable line, not a traceback
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise InputError(source, f"cannot load with datasets ({type(err).__name__}: {first})",
                         fix="check the hub id / local path and split; offline, point `path` at a local copy "
                             "or use the jsonl source") from None


def read_hf_dataset(spec) -> QAFile:
    """Records (and context paragraphs) of one `HfDatasetSpec`; record ids are `<name>-<source id>`."""
    default = DEFAULTS[spec.name]
    path = spec.path or default.path
    config = spec.config if spec.config is not None else (default.config if spec.path is None else None)
    ds = load_hf_split(path, config, spec.split)
    fmt = format_from_keys(ds.column_names)
    if fmt in (None, "passages"):
        fmt = default.format
    log.info("hf: %s (%s, split %s): %d rows, mapped as %s", spec.name, path, spec.split, len(ds), fmt)
    rows = ((i, row) for i, row in enumerate(ds, start=1))
    return map_rows(rows, fmt, f"{path}[{spec.split}]", spec.name, spec.role, spec.limit)
