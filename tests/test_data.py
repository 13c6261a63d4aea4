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
    train, _ = builtin.generate(["add", "reverse_words", "extract_json", "find_value"], 40, 0,
                                seed=1)
    for record in train:
        prompt, answer = record["messages"][1]["content"], record["messages"][2]["content"]
        if record["task"] == "add":
            a, b = prompt.removeprefix("What is ").removesuffix("?").split(" + ")
            assert int(answer) == int(a) + int(b)
        elif record["task"] == "reverse_words":
            assert answer.split() == prompt.split(": ")[1].split()[::-1]
        elif record["task"] == "find_value":
            document, question = prompt.split("\n\n")
            word, name = question.removeprefix("What code does the ").removesuffix(
                " hold?").split(" locker of ")
            assert f"The {word} locker of {name} holds code {answer}." in document.split("\n")
            assert document.count(f" locker of {name} ") >= 1
            assert document.count(f"The {word} locker of {name} ") == 1
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
    [source] = load_splits(DataConfig(path=str(path), format="alpaca", eval_fraction=0.25))
    train, held = source.train, source.eval
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


# --- sources: hub by name, saved folders, shards, columns, ShareGPT -------------------------

def cache_hub_dataset(cache, repo_id: str, splits: dict, subset: str = "default",
                      commit: str = "0" * 40) -> None:
    """Leave `repo_id` in the datasets cache as an online `load_dataset(repo_id)` does
    (`<cache>/<org>___<name>/<subset>/0.0.0/<commit>/<name>-<split>.arrow`), so that offline
    it loads by name. Built with datasets' own parquet builder, then moved under the repo's
    folder name (the builder refuses local files for a repo id)."""
    import shutil

    import datasets
    from datasets.packaged_modules.parquet.parquet import Parquet

    org, name = repo_id.split("/")
    build = cache.parent / f"build-{name}-{subset}"
    files = {}
    for split, rows in splits.items():
        files[split] = str(build / f"{split}.parquet")
        build.mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_list(rows).to_parquet(files[split])
    builder = Parquet(cache_dir=str(build / "cache"), dataset_name=name, hash=commit,
                      config_name=subset, config_id=subset, data_files=files)
    builder.download_and_prepare()
    target = cache / f"{org}___{name}" / subset
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(build / "cache" / name / subset), str(target))


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    import datasets

    cache = tmp_path / "hf-datasets"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    return cache


QA = [{"question": f"what is {i}?", "answer": str(i)} for i in range(12)]
QA_MAP = {"instruction": "question", "output": "answer"}


def test_a_hub_dataset_loads_by_name_offline_with_subset_split_and_columns(offline_hub):
    cache_hub_dataset(offline_hub, "acme/qa", {"train": QA, "test": QA[:3]})
    cache_hub_dataset(offline_hub, "acme/qa", {"train": QA[:4]}, subset="small")
    cfg = DataConfig(path="acme/qa", subset="default", format="alpaca", columns=QA_MAP,
                     eval_split="test")
    [source] = load_splits(cfg)
    assert source.train["output"] == [str(i) for i in range(12)]
    assert source.eval["instruction"] == ["what is 0?", "what is 1?", "what is 2?"]
    assert source.spec.name == "qa"
    [small] = load_splits(DataConfig(path="acme/qa", subset="small", format="alpaca",
                                     columns=QA_MAP, split="train[:3]", eval_fraction=0))
    assert small.train["output"] == ["0", "1", "2"]
    with pytest.raises(DtuneError, match=r"data.path='acme/nope'.*datasets cache"):
        load_splits(DataConfig(path="acme/nope", format="alpaca"))


def test_a_save_to_disk_folder_loads_in_place(tmp_path):
    import datasets

    rows = datasets.Dataset.from_list(ALPACA)
    rows.save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": rows, "validation": rows.select(range(4))}).save_to_disk(
        str(tmp_path / "dict"))
    [one] = load_splits(DataConfig(path=str(tmp_path / "one"), format="alpaca",
                                   eval_fraction=0))
    assert one.train["output"] == [r["output"] for r in ALPACA]
    assert all(str(tmp_path / "one") in f["filename"] for f in one.train.cache_files)  # mapped
    [both] = load_splits(DataConfig(path=str(tmp_path / "dict"), format="alpaca",
                                    eval_split="validation"))
    assert len(both.train) == 20 and both.eval["output"] == ["0", "1", "2", "3"]
    with pytest.raises(DtuneError, match=r"data.split='test'.*train, validation"):
        load_splits(DataConfig(path=str(tmp_path / "dict"), format="alpaca", split="test"))


def test_folders_and_globs_of_shards_load_and_a_bad_row_names_its_shard_and_line(tmp_path):
    import datasets

    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(3):  # train-00000-of-00003.parquet ... as the hub names them
        datasets.Dataset.from_list(ALPACA[i * 5:(i + 1) * 5]).to_parquet(
            str(shards / f"train-0000{i}-of-00003.parquet"))
    datasets.Dataset.from_list(ALPACA[15:]).to_parquet(str(shards / "test-00000-of-00001.parquet"))
    [folder] = load_splits(DataConfig(path=str(shards), format="alpaca", eval_split="test"))
    assert folder.train["output"] == [str(i) for i in range(15)]
    assert folder.eval["output"] == [str(i) for i in range(15, 20)]
    jsonl = tmp_path / "jsonl"
    jsonl.mkdir()
    write_jsonl(jsonl / "part-a.jsonl", ALPACA[:10])
    write_jsonl(jsonl / "part-b.jsonl", ALPACA[10:])
    [glob] = load_splits(DataConfig(path=str(jsonl / "part-*.jsonl"), format="alpaca",
                                    eval_fraction=0))
    assert glob.train["output"] == [str(i) for i in range(20)]
    (jsonl / "part-b.jsonl").write_text(json.dumps(ALPACA[10]) + "\n\n" +
                                        json.dumps({"instruction": "x", "output": ""}) + "\n")
    with pytest.raises(DtuneError, match=r"part-b.jsonl, line 3: the column 'output' is empty"):
        load_splits(DataConfig(path=str(jsonl / "part-*.jsonl"), format="alpaca"))
    with pytest.raises(DtuneError, match=r"the glob matches no file"):
        load_splits(DataConfig(path=str(jsonl / "nothing-*.jsonl"), format="alpaca"))


def test_columns_map_dataset_columns_to_dtune_fields_and_a_bad_mapping_says_what_exists(
        tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", QA)
    [source] = load_splits(DataConfig(path=str(path), format="alpaca", columns=QA_MAP,
                                      eval_fraction=0))
    assert source.train[0] == {"instruction": "what is 0?", "output": "0"}
    bad = {"instruction": "prompt", "output": "answer"}
    with pytest.raises(DtuneError) as caught:
        load_splits(DataConfig(path=str(path), format="alpaca", columns=bad))
    message = str(caught.value)
    assert "data.columns" in message and "'prompt'" in message
    assert "its columns are question, answer" in message
    with pytest.raises(DtuneError, match=r"maps 'instrucion', which format=alpaca does not read"):
        load_splits(DataConfig(path=str(path), format="alpaca", columns={"instrucion": "q"}))


SHAREGPT = [{"conversations": [{"from": "system", "value": "Be brief."},
                               {"from": "human", "value": f"question {i}"},
                               {"from": "gpt", "value": f"answer {i}"}]} for i in range(6)]


def test_sharegpt_rows_become_chat_messages_and_train_only_the_gpt_turns(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "share.jsonl", SHAREGPT)
    [source] = load_splits(DataConfig(path=str(path), format="sharegpt", eval_fraction=0))
    assert source.format == "chat"
    assert source.train[1]["messages"] == [{"role": "system", "content": "Be brief."},
                                           {"role": "user", "content": "question 1"},
                                           {"role": "assistant", "content": "answer 1"}]
    example = tokenize(source.train[1], "chat", tokenizer, 512, train_on_inputs=False)
    text = labelled_text(example, tokenizer)
    assert "answer 1" in text and "question" not in text and "Be brief" not in text
    robot = [{"conversations": [{"from": "human", "value": "hi"},
                                {"from": "robot", "value": "beep"}]}]
    with pytest.raises(DtuneError, match=r"line 1: message 2 has the role 'robot'.*human, gpt"):
        load_splits(DataConfig(path=str(write_jsonl(tmp_path / "r.jsonl", robot)),
                               format="sharegpt"))


def test_converting_a_save_to_disk_folder_writes_nothing_into_the_users_folder(tmp_path):
    """datasets.map writes its result beside the source's Arrow files: for a save_to_disk
    folder, the user's own folder (dtune writes only where it created things)."""
    import datasets

    folder = tmp_path / "saved"
    datasets.Dataset.from_list(SHAREGPT).save_to_disk(str(folder))
    before = sorted(p.name for p in folder.iterdir())
    [source] = load_splits(DataConfig(path=str(folder), format="sharegpt", eval_fraction=0))
    assert source.train[1]["messages"][2] == {"role": "assistant", "content": "answer 1"}
    assert sorted(p.name for p in folder.iterdir()) == before


# --- the tokenized cache: keys, processes, ranks --------------------------------------------

def chat_rows(count: int, answer: str) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"say {i} please"},
                          {"role": "assistant", "content": f"{answer} {i}"}]}
            for i in range(count)]


def prepared(tmp_path, tokenizer, *overrides):
    from conftest import TINY, compose
    from dtune.data.prepare import prepare_data
    from dtune.distributed import Ranks

    path = tmp_path / "chat.jsonl"
    if not path.exists():
        write_jsonl(path, chat_rows(40, "fine"))
    cfg = compose(*TINY, "data=file", f"data.path={path}", "data.format=chat", *overrides)
    return prepare_data(cfg, tokenizer, Ranks(), load_splits(cfg.data))


def test_a_changed_chat_template_is_never_served_from_the_cache(tmp_path, tokenizer,
                                                                monkeypatch):
    import copy

    from dtune.data import prepare

    calls = []
    real = prepare.tokenize
    monkeypatch.setattr(prepare, "tokenize", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = prepared(tmp_path, tokenizer)
    assert calls  # tokenized
    calls.clear()
    again = prepared(tmp_path, tokenizer)
    assert not calls  # the same rows, tokenizer and template: served from the cache
    other = copy.deepcopy(tokenizer)
    other.chat_template = tokenizer.chat_template.replace("<|im_start|>", "<|im_start|>>> ")
    changed = prepared(tmp_path, other)
    assert calls  # tokenized afresh
    ids = lambda data: [data.train[i].input_ids for i in range(len(data.train))]  # noqa: E731
    assert ids(first) == ids(again) != ids(changed)
    assert tokenizer.encode(">> ")[0] in ids(changed)[0]  # the new template's text is in


def test_two_processes_tokenize_the_same_examples_as_one(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("DTUNE_CACHE_DIR", str(tmp_path / "cache-1"))
    one = prepared(tmp_path, tokenizer, "data.num_proc=1")
    monkeypatch.setenv("DTUNE_CACHE_DIR", str(tmp_path / "cache-2"))  # no cache hit
    two = prepared(tmp_path, tokenizer, "data.num_proc=2")
    assert len(one.train.tables[0].table.cache_files) == 1
    assert len(two.train.tables[0].table.cache_files) == 2  # one file per process
    rows = lambda data: [(e.input_ids, e.labels) for e in  # noqa: E731
                         (data.train[i] for i in range(len(data.train)))]
    assert rows(one) == rows(two) and len(rows(one)) == 38


def test_other_ranks_poll_for_the_cache_with_a_progress_message_not_a_barrier(tmp_path,
                                                                             caplog):
    import threading
    import time

    from dtune.cache import build_once

    out = tmp_path / "tokenized" / "key-train"
    waited = {}

    def rank(local_rank: int, build) -> None:
        started = time.perf_counter()
        try:
            build_once([out], build, local_rank, "tokenizing demo", poll_s=0.05, report_s=0.3)
            waited[local_rank] = time.perf_counter() - started
        except DtuneError as exc:
            waited[local_rank] = exc

    def slow_build():
        time.sleep(1.2)
        out.mkdir(parents=True)

    caplog.set_level("INFO", logger="dtune")
    threads = [threading.Thread(target=rank, args=(r, slow_build)) for r in (1, 0, 2)]
    [t.start() for t in threads]
    [t.join(10) for t in threads]
    assert waited[1] >= 1.1 and waited[2] >= 1.1  # they waited for rank 0's files
    assert "waiting for rank 0 to finish tokenizing demo" in caplog.text
    # a failed build: the waiting ranks raise its message instead of waiting for ever
    out2 = tmp_path / "tokenized" / "key-eval"

    def failing():
        time.sleep(0.3)
        raise DtuneError("every training example is longer than data.max_seq_len=8")

    out = out2
    threads = [threading.Thread(target=rank, args=(r, failing)) for r in (0, 1)]
    [t.start() for t in threads]
    [t.join(10) for t in threads]
    assert all(isinstance(waited[r], DtuneError) for r in (0, 1))
    assert "max_seq_len=8" in str(waited[1])


# --- mixtures -------------------------------------------------------------------------------

def test_a_mixture_follows_weights_and_fractions_and_is_fixed_by_the_seed():
    from collections import Counter

    from dtune.data.mixture import mix, mixture_counts

    class Table(list):
        @property
        def lengths(self):
            return [1] * len(self)

    assert mixture_counts([100, 300], [3.0, 1.0], [None, None]) == [300, 100]
    assert mixture_counts([100, 300], [None, None], [0.5, None]) == [50, 300]
    a, b = Table(range(10)), Table(range(100, 140))
    mixed = mix([a, b], ["a", "b"], [1.0, 1.0], [None, None], seed=3)
    assert list(mixed.sources).count(0) == 25 and list(mixed.sources).count(1) == 25
    # the small source repeats to its share, every row twice before any row a third time;
    # the large one is cut to 25 distinct rows
    repeats = Counter(int(r) for s, r in zip(mixed.sources, mixed.rows) if s == 0)
    assert set(repeats) == set(range(10)) and set(repeats.values()) == {2, 3}
    assert len({int(r) for s, r in zip(mixed.sources, mixed.rows) if s == 1}) == 25
    same = mix([a, b], ["a", "b"], [1.0, 1.0], [None, None], seed=3)
    other = mix([a, b], ["a", "b"], [1.0, 1.0], [None, None], seed=4)
    assert list(same.rows) == list(mixed.rows) != list(other.rows)


def test_a_mixture_resumes_bitwise_and_reports_examples_tokens_and_eval_per_source(tmp_path):
    import shutil

    from conftest import TINY, compose
    from dtune.metrics import read_metrics
    from dtune.train import run

    write_jsonl(tmp_path / "yes.jsonl", chat_rows(60, "yes"))
    write_jsonl(tmp_path / "no.jsonl", chat_rows(30, "no"))
    write_jsonl(tmp_path / "no-eval.jsonl", chat_rows(6, "no"))
    sources = (f"data.sources=[{{path:'{tmp_path}/yes.jsonl',weight:3}},"
               f"{{path:'{tmp_path}/no.jsonl',weight:1,eval_path:'{tmp_path}/no-eval.jsonl'}}]")
    common = [*TINY, "data=mixture", "data.format=chat", "data.max_seq_len=64", sources,
              "+method=full", "train.lr=1e-3", "train.max_steps=6", "train.save_every=3",
              "eval.exact_match_samples=0"]
    whole = run(compose(*common), tmp_path / "whole")
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "whole", cut)
    shutil.rmtree(cut / "checkpoints" / "step-6")
    shutil.rmtree(cut / "final")
    (cut / "checkpoints" / "latest").write_text("step-3")
    resumed = run(compose(*common, "train.resume=true"), cut)
    steps = lambda d: [m for m in read_metrics(d / "metrics.jsonl") if "loss" in m]  # noqa: E731
    assert [m["loss"] for m in steps(cut)] == [m["loss"] for m in steps(tmp_path / "whole")]
    assert steps(cut)[-1]["examples/yes"] == steps(tmp_path / "whole")[-1]["examples/yes"]
    summary = resumed.summary
    assert summary == {**summary, "examples_per_source": whole.summary["examples_per_source"]}
    per_source = summary["examples_per_source"]
    assert set(per_source) == {"yes", "no"} and sum(per_source.values()) == 6 * 4
    assert per_source["yes"] > per_source["no"] > 0  # weight 3 against 1
    assert set(summary["tokens_per_source"]) == {"yes", "no"}
    assert set(summary["eval_loss_per_source"]) == {"yes", "no"}
    evals = [m for m in read_metrics(cut / "metrics.jsonl") if m.get("split") == "eval"]
    assert "eval_loss/no" in evals[-1] and "eval_loss/yes" in evals[-1]
