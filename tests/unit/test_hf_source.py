"""The hf source on small local datasets in hub format (no network)."""

from __future__ import annotations

import pytest

datasets = pytest.importorskip("datasets")

from searchrl.config import HfDatasetSpec  # noqa: E402
from searchrl.data.hf import read_hf_dataset  # noqa: E402
from searchrl.errors import InputError  # noqa: E402

HOTPOT_ROWS = [
    {"id": "5a8b57f2", "question": "Were Scott Derrickson and Ed Wood of the same nationality?", "answer": "yes",
     "type": "comparison", "level": "hard",
     "supporting_facts": {"title": ["Scott Derrickson", "Ed Wood"], "sent_id": [0, 0]},
     "context": {"title": ["Ed Wood", "Scott Derrickson"],
                 "sentences": [["Ed Wood was an American filmmaker."], ["Scott Derrickson is an American director."]]}},
    {"id": "5a8c7595", "question": "What position did the actress hold?", "answer": "Chief of Protocol",
     "type": "bridge", "level": "hard",
     "supporting_facts": {"title": ["Shirley Temple"], "sent_id": [1]},
     "context": {"title": ["Shirley Temple"], "sentences": [["Shirley Temple was an actress.", " She was Chief of Protocol."]]}},
]
HOTPOT_FEATURES = datasets.Features({
    "id": datasets.Value("string"), "question": datasets.Value("string"), "answer": datasets.Value("string"),
    "type": datasets.Value("string"), "level": datasets.Value("string"),
    "supporting_facts": {"title": datasets.Sequence(datasets.Value("string")),
                         "sent_id": datasets.Sequence(datasets.Value("int32"))},
    "context": {"title": datasets.Sequence(datasets.Value("string")),
                "sentences": datasets.Sequence(datasets.Sequence(datasets.Value("string")))},
})


@pytest.fixture(autouse=True)
def _hf_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def save_dict(path, splits: dict[str, list[dict]], features=None):
    dd = datasets.DatasetDict({k: datasets.Dataset.from_list(v, features=features) for k, v in splits.items()})
    dd.save_to_disk(str(path))
    return str(path)


def test_hotpotqa_saved_to_disk_maps_like_the_json_format(tmp_path):
    path = save_dict(tmp_path / "hotpot", {"validation": HOTPOT_ROWS, "train": HOTPOT_ROWS[:1]}, HOTPOT_FEATURES)
    qf = read_hf_dataset(HfDatasetSpec(name="hotpotqa", path=path))
    assert qf.format == "hotpotqa" and qf.split == "eval"
    assert [r.id for r in qf.records] == ["hotpotqa-5a8b57f2", "hotpotqa-5a8c7595"]
    assert qf.records[0].answers == ["yes"]
    assert qf.records[0].metadata["gold_titles"] == ["Scott Derrickson", "Ed Wood"]
    assert [p.title for p in qf.contexts] == ["Ed Wood", "Scott Derrickson", "Shirley Temple"]
    assert qf.contexts[2].text == "Shirley Temple was an actress. She was Chief of Protocol."
    train = read_hf_dataset(HfDatasetSpec(name="hotpotqa", path=path, split="train", role="train", limit=1))
    assert len(train.records) == 1 and train.split == "train" and train.records[0].split == "train"


def test_missing_split_lists_the_available_ones(tmp_path):
    path = save_dict(tmp_path / "hotpot", {"train": HOTPOT_ROWS}, HOTPOT_FEATURES)
    with pytest.raises(InputError, match=r"no split 'validation' \(available: train\)"):
        read_hf_dataset(HfDatasetSpec(name="hotpotqa", path=path))


def test_two_wiki_hub_layout_single_dataset_dir(tmp_path):
    # hub mirrors of 2WikiMultiHopQA store the context as {"title": [...], "content": [[sentences]]}
    rows = [{"_id": "a1", "type": "compositional", "question": "Who is the mother of the director of film X?",
             "answer": "Jane Roe",
             "context": {"title": ["Film X", "John Doe"],
                         "content": [["Film X is a film by John Doe."], ["His mother is Jane Roe."]]},
             "supporting_facts": {"title": ["Film X", "John Doe"], "sent_id": [0, 0]}}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "2wiki"))
    qf = read_hf_dataset(HfDatasetSpec(name="2wikimultihopqa", path=str(tmp_path / "2wiki")))
    (r,) = qf.records
    assert r.id == "2wikimultihopqa-a1" and r.answers == ["Jane Roe"]
    assert r.metadata["gold_titles"] == ["Film X", "John Doe"] and len(qf.contexts) == 2


def test_musique_parquet_dir_through_load_dataset(tmp_path):
    rows = [{"id": "2hop__1_2", "question": "Who is the spouse of the Green performer?", "answer": "Miquette Giraudy",
             "answer_aliases": ["M. Giraudy"], "answerable": True,
             "paragraphs": [{"idx": 0, "title": "Green", "paragraph_text": "Green is by Steve Hillage.",
                             "is_supporting": True}],
             "question_decomposition": [{"id": 1, "question": "Green >> performer", "answer": "Steve Hillage",
                                         "paragraph_support_idx": 0}]},
            {"id": "2hop__3_4", "question": "Unanswerable?", "answer": "x", "answer_aliases": [], "answerable": False,
             "paragraphs": [], "question_decomposition": []}]
    data_dir = tmp_path / "musique" / "data"
    data_dir.mkdir(parents=True)
    datasets.Dataset.from_list(rows).to_parquet(str(data_dir / "validation-00000-of-00001.parquet"))
    qf = read_hf_dataset(HfDatasetSpec(name="musique", path=str(tmp_path / "musique")))
    assert qf.format == "musique" and qf.skipped == 1
    (r,) = qf.records
    assert r.answers == ["Miquette Giraudy", "M. Giraudy"] and r.metadata["gold_titles"] == ["Green"]
    assert r.metadata["decomposition"][0]["title"] == "Green"


def test_bamboogle_question_answer_columns(tmp_path):
    rows = [{"Question": "Who was president when Citibank was founded?", "Answer": "James Madison"}]
    path = save_dict(tmp_path / "bamboogle", {"test": rows})
    qf = read_hf_dataset(HfDatasetSpec(name="bamboogle", path=path, split="test"))
    (r,) = qf.records
    assert r.id == "bamboogle-1" and r.answers == ["James Madison"] and qf.contexts == []


def test_bad_rows_name_dataset_row_and_field(tmp_path):
    rows = [dict(HOTPOT_ROWS[0]), {**HOTPOT_ROWS[1], "answer": ""}]
    path = save_dict(tmp_path / "hotpot", {"validation": rows}, HOTPOT_FEATURES)
    with pytest.raises(InputError, match=r"hotpot\[validation\], line 2, field 'answer': empty answer"):
        read_hf_dataset(HfDatasetSpec(name="hotpotqa", path=path))


def test_unloadable_path_is_an_input_error(tmp_path):
    empty = tmp_path / "nothing-here"
    empty.mkdir()
    with pytest.raises(InputError, match=r"nothing-here\[validation\]: cannot load with datasets"):
        read_hf_dataset(HfDatasetSpec(name="hotpotqa", path=str(empty)))


def test_nan_answers_and_blank_questions_name_the_split_row_and_field(tmp_path):
    """Issue 11 item 7 through the hf reader: a float column's NaN is not the gold answer "nan", a
    zero-width question is empty."""
    rows = [{"Question": "Who?", "Answer": 1.5}, {"Question": "When?", "Answer": float("nan")}]
    path = save_dict(tmp_path / "bamboogle", {"test": rows})
    with pytest.raises(InputError, match=r"\[test\], line 2, field 'Answer': answer is nan"):
        read_hf_dataset(HfDatasetSpec(name="bamboogle", path=path, split="test"))
    rows = [{"Question": "Who?", "Answer": "A"}, {"Question": "\u200b\u00a0", "Answer": "B"}]
    path = save_dict(tmp_path / "bamboogle2", {"test": rows})
    with pytest.raises(InputError, match=r"\[test\], line 2, field 'Question': empty question"):
        read_hf_dataset(HfDatasetSpec(name="bamboogle", path=path, split="test"))
