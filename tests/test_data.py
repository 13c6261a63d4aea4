"""Data: the built-in set, file loading with located errors, and loss masks per format."""
import json

import pytest

from dtune.config import DataConfig
from dtune.data import builtin
from dtune.data.formatting import IGNORE, tokenize
from dtune.data.loading import load_splits, read_records
from dtune.errors import DtuneError
from dtune.models import build_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer(512)


def labelled_text(example, tokenizer) -> str:
    return tokenizer.decode([t for t, l in zip(example.input_ids, example.labels) if l != IGNORE])


# --- the built-in dataset ---------------------------------------------------------------

def test_builtin_is_deterministic_disjoint_and_covers_every_task():
    train, held = builtin.generate(list(builtin.TASKS), 500, 100, seed=3)
    again, held_again = builtin.generate(list(builtin.TASKS), 500, 100, seed=3)
    assert train == again and held == held_again
    prompts = lambda records: {r["messages"][1]["content"] for r in records}  # noqa: E731
    assert not prompts(train) & prompts(held)
    assert {r["task"] for r in held} == set(builtin.TASKS)
    assert len(train) == 500 and len(held) == 100


def test_builtin_answers_are_right():
    train, _ = builtin.generate(["add", "reverse_words", "extract_json"], 30, 0, seed=1)
    for record in train:
        prompt, answer = record["messages"][1]["content"], record["messages"][2]["content"]
        if record["task"] == "add":
            a, b = prompt.removeprefix("What is ").removesuffix("?").split(" + ")
            assert int(answer) == int(a) + int(b)
        elif record["task"] == "reverse_words":
            assert answer.split() == prompt.split(": ")[1].split()[::-1]
        else:
            parsed = json.loads(answer)
            assert parsed["name"] in prompt and parsed["city"] in prompt
            assert str(parsed["age"]) in prompt


def test_unknown_builtin_task_is_refused():
    with pytest.raises(DtuneError, match="data.builtin.tasks"):
        builtin.generate(["add", "poetry"], 10, 10, seed=0)


# --- loss masks -------------------------------------------------------------------------

def test_chat_trains_every_assistant_turn_and_nothing_else(tokenizer):
    record = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "alpha answer"},
        {"role": "user", "content": "second question"},
        {"role": "assistant", "content": "omega answer"},
    ]}
    example = tokenize(record, "chat", tokenizer, 512, train_on_inputs=False)
    text = labelled_text(example, tokenizer)
    assert "alpha answer" in text and "omega answer" in text
    assert "question" not in text and "Be brief" not in text and "user" not in text
    assert text.count("<|im_end|>") == 2  # the end-of-turn token is learned, so generation stops


def test_alpaca_trains_only_the_output(tokenizer):
    record = {"instruction": "Add the numbers", "input": "2 and 3", "output": "5"}
    example = tokenize(record, "alpaca", tokenizer, 512, train_on_inputs=False)
    assert labelled_text(example, tokenizer) == "5<|im_end|>"


def test_text_and_train_on_inputs_train_every_token(tokenizer):
    text_example = tokenize({"text": "plain words"}, "text", tokenizer, 512, False)
    assert IGNORE not in text_example.labels
    record = {"instruction": "Add", "output": "5"}
    inputs_too = tokenize(record, "alpaca", tokenizer, 512, train_on_inputs=True)
    assert inputs_too.labels == inputs_too.input_ids


def test_truncation_keeps_ids_and_labels_aligned(tokenizer):
    record = {"text": "word " * 200}
    example = tokenize(record, "text", tokenizer, 16, False)
    assert len(example.input_ids) == len(example.labels) == 16


# --- files ------------------------------------------------------------------------------

def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ALPACA = [{"instruction": f"say {i}", "input": "", "output": str(i)} for i in range(20)]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_every_supported_file_type_loads(tmp_path, suffix):
    import datasets

    path = tmp_path / f"data{suffix}"
    table = datasets.Dataset.from_list(ALPACA)
    {".jsonl": lambda: table.to_json(str(path), lines=True),
     ".json": lambda: path.write_text(json.dumps(ALPACA)),
     ".csv": lambda: table.to_csv(str(path), index=False),
     ".parquet": lambda: table.to_parquet(str(path))}[suffix]()
    rows = read_records(str(path), "alpaca", "data.path")
    assert [r["output"] for r in rows] == [str(i) for i in range(20)]


def test_eval_fraction_holds_out_rows_without_overlap(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ALPACA)
    train, held = load_splits(DataConfig(path=str(path), format="alpaca", eval_fraction=0.25))
    assert len(held) == 5 and len(train) == 15
    assert not {r["output"] for r in train} & {r["output"] for r in held}


def test_malformed_jsonl_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ALPACA[0]) + "\n\n" + '{"instruction": "x", "output": \n')
    with pytest.raises(DtuneError, match=r"bad.jsonl, line 3: malformed JSON"):
        read_records(str(path), "alpaca", "data.path")


def test_missing_column_names_the_column_and_line(tmp_path):
    rows = ALPACA[:3] + [{"instruction": "no output here", "input": "", "output": None}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DtuneError, match=r"line 4: the column 'output' is missing"):
        read_records(str(path), "alpaca", "data.path")


def test_empty_response_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ALPACA[:2] + [{"instruction": "x", "output": "  "}])
    with pytest.raises(DtuneError, match=r"line 3: the column 'output' is empty"):
        read_records(str(path), "alpaca", "data.path")


def test_unknown_chat_role_is_refused(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hi"},
                          {"role": "robot", "content": "beep"}]}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    with pytest.raises(DtuneError, match=r"line 1: message 2 has the role 'robot'"):
        read_records(str(path), "chat", "data.path")


def test_non_string_field_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": 42}])
    with pytest.raises(DtuneError, match=r"line 1: the column 'text' must be a string"):
        read_records(str(path), "text", "data.path")


def test_missing_empty_and_unsupported_files_are_refused(tmp_path):
    with pytest.raises(DtuneError, match="no such file"):
        read_records(str(tmp_path / "nope.jsonl"), "text", "data.path")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DtuneError, match="is empty"):
        read_records(str(tmp_path / "empty.jsonl"), "text", "data.path")
    (tmp_path / "data.xlsx").write_text("x")
    with pytest.raises(DtuneError, match="'.xlsx'"):
        read_records(str(tmp_path / "data.xlsx"), "text", "data.path")
