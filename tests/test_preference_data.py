"""Preference data (data.format=preference): rendering and response-only labels, truncation,
located errors for bad rows, the built-in pairs, the cache, and the pair batches the
objectives read (chosen rows first, then the rejected rows of the same pairs)."""
import copy
import json
from dataclasses import replace

import pytest
import torch

from dtune.config import BuiltinDataConfig, Config, DataConfig, SourceConfig
from dtune.data import builtin
from dtune.data.batching import BatchStream, collate_pairs
from dtune.data.formatting import IGNORE, Example
from dtune.data.loading import SourceRows, load_splits, read_records
from dtune.data.preference import PairExample, tokenize_pair
from dtune.errors import DtuneError
from dtune.models import build_tiny_tokenizer

PAIR = {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer(512)


@pytest.fixture(scope="module")
def plain(tokenizer):
    """The same tokenizer without a chat template."""
    other = copy.deepcopy(tokenizer)
    other.chat_template = None
    return other


def labelled(example: Example, tokenizer) -> str:
    return tokenizer.decode([t for t, l in zip(example.input_ids, example.labels) if l != IGNORE])


def prompt_part(example: Example) -> list[int]:
    return example.input_ids[: next(i for i, l in enumerate(example.labels) if l != IGNORE)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pair_rows(count: int) -> list[dict]:
    return [{"prompt": f"say {i} please", "chosen": f"yes {i}", "rejected": f"no {i}"}
            for i in range(count)]


def preference_config(**data) -> Config:
    """A Config built directly (not composed): the data settings are all these tests read."""
    return Config(data=DataConfig(format="preference", **data))


# --- rendering and labels ---------------------------------------------------------------

def test_with_a_chat_template_the_response_is_the_assistant_turn_and_alone_carries_loss(
        tokenizer):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is 2 + 2?"}]
    for row in (PAIR, {"messages": messages, "chosen": "4", "rejected": "5"}):
        pair = tokenize_pair(row, tokenizer, 128)
        # the template's end of turn belongs to the response: the model is scored on stopping
        assert labelled(pair.chosen, tokenizer) == "4<|im_end|>\n"
        assert labelled(pair.rejected, tokenizer) == "5<|im_end|>\n"
        prompt = tokenizer.decode(prompt_part(pair.chosen))
        assert prompt.endswith("<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n"
                               "<|im_start|>assistant\n")
        assert prompt_part(pair.chosen) == prompt_part(pair.rejected)  # one shared prompt
    with_system = tokenize_pair({"messages": messages, "chosen": "4", "rejected": "5"},
                                tokenizer, 128)
    assert "Be brief." in tokenizer.decode(with_system.chosen.input_ids)


def test_without_a_chat_template_a_pair_is_prompt_response_eos(plain):
    pair = tokenize_pair({"prompt": "Q: 2 + 2? A:", "chosen": " 4", "rejected": " 5"}, plain,
                         128)
    assert plain.decode(pair.chosen.input_ids) == "Q: 2 + 2? A: 4" + plain.eos_token
    assert labelled(pair.chosen, plain) == " 4" + plain.eos_token
    assert labelled(pair.rejected, plain) == " 5" + plain.eos_token
    with pytest.raises(DtuneError, match="need a chat template.*data.chat_template=chatml"):
        tokenize_pair({"messages": [{"role": "user", "content": "hi"}], "chosen": "a",
                       "rejected": "b"}, plain, 128)


def test_a_long_prompt_is_cut_from_the_left_and_keeps_its_end(tokenizer):
    words = " ".join(f"w{i}" for i in range(400))
    pair = tokenize_pair({"prompt": words, "chosen": "yes it is", "rejected": "no"},
                         tokenizer, 64)
    for example, response in ((pair.chosen, "yes it is"), (pair.rejected, "no")):
        assert len(example.input_ids) <= 64
        text = tokenizer.decode(example.input_ids)
        assert text.endswith("w399<|im_end|>\n<|im_start|>assistant\n" + response +
                             "<|im_end|>\n")  # the prompt's end and the whole response
        assert "w0 " not in text and "<|im_start|>user" not in text  # its start went first
        assert labelled(example, tokenizer) == response + "<|im_end|>\n"
    assert len(pair.chosen.input_ids) == 64  # the longer pair fills the window exactly


def test_long_responses_are_cut_from_the_right_after_the_prompt_is_halved(tokenizer):
    long = " ".join(f"r{i}" for i in range(2000)) * 20  # past the per-row character bound
    words = " ".join(f"w{i}" for i in range(400))
    pair = tokenize_pair({"prompt": words, "chosen": long, "rejected": "short"}, tokenizer, 64)
    assert len(pair.chosen.input_ids) == 64
    assert len(prompt_part(pair.chosen)) == 32  # half of max_seq_len stays prompt
    assert tokenizer.decode(prompt_part(pair.chosen)).endswith("w399<|im_end|>\n"
                                                               "<|im_start|>assistant\n")
    kept = labelled(pair.chosen, tokenizer)
    assert long.startswith(kept) and "<|im_end|>" not in kept  # a cut response never "ends"
    assert labelled(pair.rejected, tokenizer) == "short<|im_end|>\n"
    assert prompt_part(pair.rejected) == prompt_part(pair.chosen)


def test_a_bos_the_tokenizer_adds_stays_first_when_the_prompt_is_cut(plain):
    from tokenizers.processors import TemplateProcessing

    with_bos = copy.deepcopy(plain)
    bos = with_bos.convert_tokens_to_ids("<|endoftext|>")
    with_bos._tokenizer.post_processor = TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)])
    words = " ".join(f"w{i}" for i in range(400))
    pair = tokenize_pair({"prompt": words, "chosen": " yes", "rejected": " no"}, with_bos, 32)
    assert pair.chosen.input_ids[0] == bos and len(pair.chosen.input_ids) <= 32
    assert with_bos.decode(pair.chosen.input_ids[1:]).endswith("w399 yes" + plain.eos_token)


# --- bad rows: one paragraph naming the file and line -------------------------------------

BAD_ROWS = [
    ({"prompt": "q", "rejected": "b"}, "the column 'chosen' is missing"),
    ({"prompt": "q", "chosen": "a"}, "the column 'rejected' is missing"),
    ({"prompt": "q", "chosen": "same", "rejected": " same "}, "'chosen' and 'rejected' are the "
                                                             "same response"),
    ({"prompt": "q", "chosen": "", "rejected": "b"}, "the column 'chosen' is empty"),
    ({"prompt": "q", "chosen": "a", "rejected": "  "}, "the column 'rejected' is empty"),
    ({"prompt": "  ", "chosen": "a", "rejected": "b"}, "the column 'prompt' is empty"),
    ({"chosen": "a", "rejected": "b"}, "has neither"),
    ({"prompt": "q", "messages": [{"role": "user", "content": "q"}], "chosen": "a",
      "rejected": "b"}, "has both"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "chosen": "a", "rejected": "b"}, "end with a turn of the role 'assistant'; .* must end "
                                       "with the user turn"),
    ({"messages": [], "chosen": "a", "rejected": "b"}, "non-empty list"),
]


@pytest.mark.parametrize("row, message", BAD_ROWS, ids=[m[:24] for _, m in BAD_ROWS])
def test_a_bad_row_is_named_by_file_and_line(tmp_path, row, message):
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    if "messages" in row:
        good = {**good, "messages": [{"role": "user", "content": "q"}], "prompt": None}
    # Both rows have every column (None where unset), so the file reads as one table; the
    # blank line makes the bad row's line (3) differ from its record number (2).
    bad = {**{k: None for k in good}, **row}
    good = {**{k: None for k in row}, **good}
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n")
    with pytest.raises(DtuneError, match=rf"pairs.jsonl, line 3: .*{message}") as caught:
        read_records(str(path), "preference", "data.path")
    assert "\n" not in str(caught.value)  # one paragraph


def test_non_string_responses_are_refused_with_their_type(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "q", "chosen": 4, "rejected": 5}])
    with pytest.raises(DtuneError, match=r"line 1: the column 'chosen' must be a string, "
                                         r"found int 4"):
        read_records(str(path), "preference", "data.path")


def test_columns_map_a_dataset_onto_prompt_chosen_and_rejected(tmp_path):
    rows = [{"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"]}
            for r in pair_rows(10)]
    path = write_jsonl(tmp_path / "mine.jsonl", rows)
    data = DataConfig(path=str(path), format="preference", eval_fraction=0.2,
                      columns={"prompt": "question", "chosen": "good", "rejected": "bad"})
    (source,) = load_splits(data)
    assert set(source.train.column_names) == {"prompt", "chosen", "rejected"}
    assert len(source.train) == 8 and len(source.eval) == 2
    with pytest.raises(DtuneError, match="maps 'output', which format=preference does not "
                                         "read.*prompt, messages, chosen, rejected"):
        load_splits(DataConfig(path=str(path), format="preference", columns={"output": "bad"}))


def test_settings_that_cannot_apply_to_pairs_are_refused(tmp_path):
    with pytest.raises(DtuneError, match="data.train_on_inputs=true does not apply"):
        DataConfig(format="preference", train_on_inputs=True)
    pairs, chat = write_jsonl(tmp_path / "p.jsonl", pair_rows(4)), tmp_path / "c.jsonl"
    write_jsonl(chat, [{"messages": [{"role": "user", "content": "hi"},
                                     {"role": "assistant", "content": "yo"}]}])
    mixed = DataConfig(path=None, format="chat", sources=[
        SourceConfig(path=str(pairs), format="preference"), SourceConfig(path=str(chat))])
    with pytest.raises(DtuneError, match="p hold preference pairs .* and c do not"):
        load_splits(mixed)
    with pytest.raises(DtuneError, match="data.packing=true does not apply to preference"):
        BatchStream([pair_example(0, 3, 2)], 1, seed=0, pad_id=0, pack_len=64)
    from dtune.data.settings import check_data_settings

    # pairs stream (issue 27); a stream has no length, so it needs train.max_steps
    streamed = preference_config(path=str(pairs), streaming=True)
    with pytest.raises(DtuneError, match="data.streaming=true needs train.max_steps"):
        check_data_settings(streamed)
    streamed.train.max_steps = 4
    check_data_settings(streamed)
    # a stream has no epochs: train.epochs would be ignored (it crashed the step plan)
    streamed.train.epochs = 2
    with pytest.raises(DtuneError, match="train.epochs=2 with data.streaming=true"):
        check_data_settings(streamed)


# --- the built-in preference task ---------------------------------------------------------

def test_builtin_pairs_are_deterministic_disjoint_and_cover_every_task():
    tasks = list(builtin.TASKS)
    train, held = builtin.generate_pairs(tasks, 300, 60, seed=5)
    assert (train, held) == builtin.generate_pairs(tasks, 300, 60, seed=5)
    assert train != builtin.generate_pairs(tasks, 300, 60, seed=6)[0]
    prompt = lambda r: r["messages"][-1]["content"]  # noqa: E731
    assert not {prompt(r) for r in train} & {prompt(r) for r in held}
    assert {r["task"] for r in held} == set(tasks) == set(builtin.WRONG)
    # the prompts are the SFT set's: an SFT run's held-out prompts stay held out for DPO
    _, sft_held = builtin.generate(tasks, 300, 60, seed=5)
    assert [prompt(r) for r in held] == [r["messages"][1]["content"] for r in sft_held]
    for record in train:
        assert [m["role"] for m in record["messages"]] == ["system", "user"]


def test_builtin_chosen_is_right_and_rejected_is_wrong_by_a_small_perturbation():
    train, _ = builtin.generate_pairs(list(builtin.TASKS), 200, 0, seed=1)
    for record in train:
        prompt, chosen, rejected = (record["messages"][-1]["content"], record["chosen"],
                                    record["rejected"])
        task = record["task"]
        if task == "add":
            a, b = prompt.removeprefix("What is ").removesuffix("?").split(" + ")
            assert int(chosen) == int(a) + int(b) and abs(int(rejected) - int(chosen)) == 1
        elif task == "reverse_words":
            words = prompt.split(": ")[1].split()
            assert chosen.split() == words[::-1]
            assert rejected.split() == words  # left in the prompt's order
        elif task == "sort_numbers":
            given = prompt.split(": ")[1]
            numbers = [int(n) for n in given.split(", ")]
            assert chosen == ", ".join(map(str, sorted(numbers)))
            if given != chosen:  # left in the prompt's order
                assert rejected == given
            else:  # an already sorted prompt: two neighbours swapped
                assert sorted(map(int, rejected.split(", "))) == numbers and rejected != chosen
        elif task == "convert_units":
            _, amount, src, _, dst = prompt.removesuffix(".").split()
            assert chosen.split()[1] == dst and rejected == f"{amount} {dst}" != chosen
        elif task == "find_value":  # another line's code of the same document
            assert f"code {rejected}." in prompt and rejected != chosen
        else:
            parsed = json.loads(chosen)
            assert parsed["name"] in prompt and str(parsed["age"]) in prompt
            with pytest.raises(json.JSONDecodeError):
                json.loads(rejected)
            # one small break: the closing brace, the double quotes or a comma
            assert rejected in (chosen[:-1], chosen.replace('"', "'"),
                                chosen.replace(", ", " ", 1))


def test_data_builtin_preference_composes_and_loads_pairs():
    from conftest import compose

    cfg = compose("objective=dpo", "data=builtin_preference", "data.builtin.train_size=20",
                  "data.builtin.eval_size=4")
    assert cfg.data.format == "preference" and cfg.data.max_seq_len <= 128
    (source,) = load_splits(cfg.data)
    assert len(source.train) == 20 and len(source.eval) == 4
    assert {"messages", "chosen", "rejected"} <= set(source.train.column_names)


# --- the tokenized table, its cache and the eval split -------------------------------------

def prepared(cfg: Config, tokenizer):
    from dtune.data.prepare import prepare_data
    from dtune.distributed import Ranks

    return prepare_data(cfg, tokenizer, Ranks(), load_splits(cfg.data))


def test_pairs_tokenize_into_the_cache_with_their_held_out_split(tokenizer, tmp_path):
    from dtune.data.prepare import PairTable

    data = prepared(preference_config(
        max_seq_len=128, builtin=BuiltinDataConfig(train_size=24, eval_size=6)), tokenizer)
    table = data.train.tables[0]
    assert isinstance(table, PairTable) and len(data.train) == 24
    assert set(table.table.column_names) == {"chosen_input_ids", "chosen_labels",
                                             "rejected_input_ids", "rejected_labels", "length",
                                             "identical_row"}
    pair = data.train[0]
    assert isinstance(pair, PairExample) and data.train.lengths[0] == pair.length == max(
        len(pair.chosen.input_ids), len(pair.rejected.input_ids))
    held = data.evals["builtin"]
    assert isinstance(held, PairTable) and len(held) == 6
    assert labelled(held[0].chosen, tokenizer) != labelled(held[0].rejected, tokenizer)
    # a file's eval_fraction holds out pairs the same way
    path = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(20))
    from_file = prepared(preference_config(path=str(path), eval_fraction=0.25), tokenizer)
    assert len(from_file.train) == 15 and isinstance(from_file.evals["pairs"], PairTable)
    assert len(from_file.evals["pairs"]) == 5


def test_sft_and_preference_caches_never_mix(tokenizer, monkeypatch):
    from dtune.data import prepare

    built = BuiltinDataConfig(train_size=16, eval_size=4)
    sft = Config(data=DataConfig(format="chat", max_seq_len=128, builtin=built))
    pairs = preference_config(max_seq_len=128, builtin=built)
    first_sft, first_pairs = prepared(sft, tokenizer), prepared(pairs, tokenizer)
    calls = []
    monkeypatch.setattr(prepare, "tokenize_pair", lambda *a: calls.append(1))
    monkeypatch.setattr(prepare, "tokenize", lambda *a: calls.append(1))
    again_pairs, again_sft = prepared(pairs, tokenizer), prepared(sft, tokenizer)
    assert not calls  # both served from the cache, each from its own folder
    assert isinstance(again_pairs.train[0], PairExample)
    assert isinstance(again_sft.train[0], Example)
    assert again_pairs.train[3] == first_pairs.train[3]
    assert again_sft.train[3] == first_sft.train[3]
    # the format alone changes the key: the same rows read as pairs never hit the SFT cache
    (source,) = load_splits(sft.data)
    as_pairs = SourceRows(replace(source.spec, format="preference"), source.train, source.eval)
    assert prepare.fingerprint(sft, tokenizer, source) != \
        prepare.fingerprint(sft, tokenizer, as_pairs)


# --- pairs that truncation makes identical --------------------------------------------------

def long_pair(i: int) -> dict:
    """A pair whose responses share their first 60 words: cut to 32 tokens, they are one."""
    shared = " ".join(["shared"] * 60)
    return {"prompt": f"say {i} please", "chosen": f"{shared} yes {i}",
            "rejected": f"{shared} no {i}"}


def held_out(count: int, fraction: float) -> set[int]:
    """The rows dtune holds out for eval (loading.hold_out's fixed draw)."""
    import numpy as np

    return set(np.random.default_rng(0).permutation(count)[:max(1, int(count * fraction))])


def test_most_pairs_identical_after_truncation_are_refused_naming_the_first_line(
        tokenizer, tmp_path, monkeypatch):
    from dtune.data import prepare

    rows = pair_rows(3) + [long_pair(i) for i in range(3, 12)]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    cfg = preference_config(path=str(path), max_seq_len=32, eval_fraction=0.25)
    held = held_out(len(rows), 0.25)
    identical = [i for i in range(3, 12) if i not in held]
    with pytest.raises(DtuneError) as caught:
        prepared(cfg, tokenizer)
    message = str(caught.value)
    assert f"{len(identical)} of the 9 training pairs of long become identical when cut to " \
           "data.max_seq_len=32 tokens" in message
    assert f"(the first: {path}, line {identical[0] + 1})" in message
    assert "Raise data.max_seq_len" in message and "\n" not in message
    # a warm cache knows the count without tokenizing anything
    monkeypatch.setattr(prepare, "tokenize_pair", lambda *a: pytest.fail("tokenized again"))
    with pytest.raises(DtuneError) as again:
        prepared(cfg, tokenizer)
    assert str(again.value) == message


def test_a_minority_of_identical_pairs_is_warned_about_and_counted_in_the_summary(
        tmp_path, caplog):
    """In one DPO run, tokenized by two processes (data.num_proc=2)."""
    from conftest import TINY, train

    rows = pair_rows(16) + [long_pair(i) for i in range(16, 20)]
    path = write_jsonl(tmp_path / "some-long.jsonl", rows)
    with caplog.at_level("WARNING", logger="dtune"):
        result = train(tmp_path / "run", *TINY, "+method=lora", "objective=dpo",
                       "data.format=preference", f"data.path={path}", "data.eval_fraction=0",
                       "data.max_seq_len=32", "data.num_proc=2", "train.max_steps=1",
                       "eval.exact_match_samples=0")
    assert result.summary["pairs_identical_after_truncation"] == 4
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["pairs_identical_after_truncation"] == 4
    warnings = [r.getMessage() for r in caplog.records if "become identical" in r.getMessage()]
    assert len(warnings) == 1
    assert "4 of the 20 training pairs of some-long" in warnings[0]
    assert f"(the first: {path}, line 17)" in warnings[0]


# --- pair batches -----------------------------------------------------------------------------

def pair_example(i: int, chosen: int, rejected: int, prompt: int = 2) -> PairExample:
    """Pair i: a prompt of `prompt` tokens (100 + i), then responses of the given lengths."""
    def side(length: int, token: int) -> Example:
        return Example([100 + i] * prompt + [token] * length,
                       [IGNORE] * prompt + [token] * length)
    return PairExample(side(chosen, 200 + i), side(rejected, 300 + i))


def test_collate_pairs_puts_chosen_rows_first_and_rejected_rows_after_in_the_same_order():
    pairs = [pair_example(0, 3, 1), pair_example(1, 1, 5), pair_example(2, 2, 2)]
    batch = collate_pairs(pairs, pad_id=7, indices=[10, 11, 12])
    assert set(batch) == {"input_ids", "labels", "attention_mask", "pair_index",
                          "label_positions", "label_rows"}
    assert batch["input_ids"].shape == batch["labels"].shape == (6, 7)  # longest: 2 + 5
    assert batch["pair_index"].tolist() == [10, 11, 12]
    assert batch["pair_index"].dtype == torch.long
    for row, (pair, side) in enumerate([(p, "chosen") for p in pairs] +
                                       [(p, "rejected") for p in pairs]):
        example = getattr(pair, side)
        n = len(example.input_ids)
        assert batch["input_ids"][row, :n].tolist() == example.input_ids
        assert batch["input_ids"][row, n:].tolist() == [7] * (7 - n)  # right padded
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (7 - n)
        # labels only on response tokens: never on the prompt, never on padding
        labelled_at = (batch["labels"][row] != IGNORE).nonzero().flatten().tolist()
        assert labelled_at == list(range(2, n))
        assert batch["labels"][row, 2:n].tolist() == example.labels[2:]
    # the loss's flat target positions, found at collation: every scored next token, in order
    scored = (batch["labels"][:, 1:] != IGNORE).reshape(-1).nonzero().flatten()
    assert batch["label_positions"].tolist() == scored.tolist()
    assert batch["label_rows"].tolist() == (scored // 6).tolist()


def test_pair_windows_split_over_ranks_and_resume_like_examples():
    pairs = [pair_example(i, 1 + i % 3, 1 + i % 4) for i in range(21)]

    def windows(stream, steps):
        return [stream.next_window(2) for _ in range(steps)]

    whole = windows(BatchStream(pairs, 2, seed=3, pad_id=0), 8)
    ranks = [windows(BatchStream(pairs, 2, seed=3, pad_id=0, rank=r, world_size=2), 4)
             for r in range(2)]
    # One step of 2 ranks x 2 micro-batches holds what two steps of 1 rank x 2 hold, rank 0
    # taking the first block of the window and rank 1 the second.
    flat_whole = [b for w in whole for b in w]
    flat_ranks = [b for step in zip(*ranks) for w in step for b in w]
    assert [b["pair_index"].tolist() for b in flat_ranks] == \
        [b["pair_index"].tolist() for b in flat_whole]
    assert all(torch.equal(a["input_ids"], b["input_ids"])
               for a, b in zip(flat_ranks, flat_whole))
    for batch in flat_whole:  # each row is the pair pair_index names
        n = len(batch["pair_index"])
        assert batch["input_ids"].shape[0] == 2 * n
        for j, index in enumerate(batch["pair_index"].tolist()):
            assert batch["input_ids"][j, 0] == batch["input_ids"][n + j, 0] == 100 + index
            assert batch["input_ids"][j, 2] == 200 + index
            assert batch["input_ids"][n + j, 2] == 300 + index
    seen = [i for b in flat_whole[:11] for i in b["pair_index"].tolist()]
    assert sorted(seen) == list(range(21))  # one epoch: every pair once
    # resume: a fresh stream given the state continues with the same windows
    stream = BatchStream(pairs, 2, seed=3, pad_id=0)
    windows(stream, 5)
    resumed = BatchStream(pairs, 2, seed=3, pad_id=0)
    resumed.load_state_dict(stream.state_dict())
    assert [[b["pair_index"].tolist() for b in w] for w in windows(resumed, 3)] == \
        [[b["pair_index"].tolist() for b in w] for w in whole[5:8]]
