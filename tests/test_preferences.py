"""Preference sets (webui/preferences.py): rows exactly in TRL's conversational formats, a pairs file that plain
`datasets` loads with TRL's three columns, names that cannot leave the folder, refused empty or identical pairs,
and the counts."""
import json

import pytest

from webui.errors import BadInput
from webui.preferences import append_pair, append_rating, counts, list_sets, ratings_path, set_path

SYSTEM = {"role": "system", "content": "You are terse."}
HISTORY = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]
ASK = {"role": "user", "content": "Name a colour."}


def rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_a_pair_is_trls_conversational_preference_row(tmp_path):
    folder = tmp_path / "preferences"  # created on the first write
    path = append_pair(folder, "voice", [SYSTEM, *HISTORY, ASK], "Blue.", "Well, there are many colours.")
    assert path == folder / "voice.jsonl" == set_path(folder, "voice")
    assert rows(path) == [{"prompt": [SYSTEM, *HISTORY, ASK],
                           "chosen": [{"role": "assistant", "content": "Blue."}],
                           "rejected": [{"role": "assistant", "content": "Well, there are many colours."}]}]


def test_a_rating_is_trls_unpaired_row_in_its_own_file(tmp_path):
    path = append_rating(tmp_path, "voice", [SYSTEM, ASK], "Blue.", True)
    append_rating(tmp_path, "voice", [ASK], "Hmm.", False)
    assert path == tmp_path / "voice.ratings.jsonl" == ratings_path(tmp_path, "voice")
    assert rows(path) == [
        {"prompt": [SYSTEM, ASK], "completion": [{"role": "assistant", "content": "Blue."}], "label": True},
        {"prompt": [ASK], "completion": [{"role": "assistant", "content": "Hmm."}], "label": False}]
    assert not set_path(tmp_path, "voice").exists()  # the pairs file stays a plain DPO dataset


def test_an_empty_system_prompt_is_left_out_and_the_prompt_ends_with_the_user(tmp_path):
    path = append_pair(tmp_path, "s", [{"role": "system", "content": "  "}, ASK], "A", "B")
    assert rows(path)[0]["prompt"] == [ASK]
    with pytest.raises(BadInput, match="user's turn"):
        append_pair(tmp_path, "s", [ASK, {"role": "assistant", "content": "x"}], "A", "B")
    with pytest.raises(BadInput, match="user's turn"):
        append_rating(tmp_path, "s", [], "A", True)


def test_a_pairs_file_loads_as_a_dataset_with_trls_columns(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "preferences"
    append_pair(folder, "voice", [SYSTEM, *HISTORY, ASK], "Blue.", "Many.")
    append_pair(folder, "voice", [ASK], "Red.", "I cannot say.")
    append_rating(folder, "voice", [ASK], "Green.", True)  # in the ratings file: the pairs file stays clean
    data = datasets.load_dataset("json", data_files=str(set_path(folder, "voice")), split="train",
                                 cache_dir=str(tmp_path / "cache"))
    assert data.column_names == ["prompt", "chosen", "rejected"]
    assert data.num_rows == 2
    assert data[1] == {"prompt": [ASK], "chosen": [{"role": "assistant", "content": "Red."}],
                       "rejected": [{"role": "assistant", "content": "I cannot say."}]}
    ratings = datasets.load_dataset("json", data_files=str(ratings_path(folder, "voice")), split="train",
                                    cache_dir=str(tmp_path / "cache"))
    assert ratings.column_names == ["prompt", "completion", "label"]


@pytest.mark.parametrize("name", ["", "  ", "../out", "a/b", ".hidden", "x" * 81, "voice.ratings"])
def test_bad_names_are_refused(tmp_path, name):
    with pytest.raises(BadInput, match="name"):
        append_pair(tmp_path, name, [ASK], "A", "B")
    with pytest.raises(BadInput):
        counts(tmp_path, name)
    assert list(tmp_path.iterdir()) == []


def test_a_link_out_of_the_folder_is_refused(tmp_path):
    folder, outside = tmp_path / "preferences", tmp_path / "elsewhere.jsonl"
    folder.mkdir()
    (folder / "voice.jsonl").symlink_to(outside)
    with pytest.raises(BadInput, match="outside"):
        append_pair(folder, "voice", [ASK], "A", "B")
    assert not outside.exists()


@pytest.mark.parametrize("chosen,rejected,why", [("", "B", "chosen reply is empty"),
                                                 ("A", " \n", "rejected reply is empty"),
                                                 ("Same.", "Same.", "the same"), ("Same.", "Same. ", "the same")])
def test_empty_or_identical_replies_are_refused(tmp_path, chosen, rejected, why):
    with pytest.raises(BadInput, match=why):
        append_pair(tmp_path, "voice", [ASK], chosen, rejected)
    assert counts(tmp_path, "voice") == (0, 0)


def test_counts_and_sets(tmp_path):
    assert counts(tmp_path / "none", "voice") == (0, 0) and list_sets(tmp_path / "none") == []
    for i in range(3):
        append_pair(tmp_path, "voice", [ASK], f"A{i}", "B")
    append_rating(tmp_path, "voice", [ASK], "A", True)
    append_rating(tmp_path, "tone", [ASK], "A", False)
    assert counts(tmp_path, "voice") == (3, 1)
    assert counts(tmp_path, " tone ") == (0, 1)
    assert sorted(list_sets(tmp_path)) == ["tone", "voice"]


def test_appending_keeps_what_is_there(tmp_path):
    path = set_path(tmp_path, "voice")
    path.write_text('{"prompt": [], "chosen": [], "rejected": []}\n', encoding="utf-8")  # written earlier, by hand
    append_pair(tmp_path, "voice", [ASK], "A", "B")
    assert len(rows(path)) == 2 and rows(path)[0] == {"prompt": [], "chosen": [], "rejected": []}
