"""data.streaming=true: rows read and tokenized as training goes, in a seeded order that resumes
exactly and splits across ranks as the tokenized-up-front stream does."""
import json
import shutil

import datasets
import pytest

from conftest import TINY, compose
from dtune.data.formatting import Example
from dtune.data.streaming import StreamingBatches, example_maker
from dtune.errors import DtuneError
from dtune.metrics import read_metrics
from dtune.train import run


def numbered_stream(count: int):
    """A stream of rows {"i": 0..count-1}, opened afresh on each call, as open_rows is."""
    return lambda: datasets.Dataset.from_list([{"i": i} for i in range(count)]) \
        .to_iterable_dataset()


def as_example(record: dict, index: int) -> Example:
    """Row i becomes an example of i % 5 + 1 tokens, all equal to i: batches show which rows
    they hold (packing gets unequal lengths)."""
    return Example([record["i"]] * (record["i"] % 5 + 1), [record["i"]] * (record["i"] % 5 + 1))


def stream(count=50, **kwargs) -> StreamingBatches:
    return StreamingBatches(numbered_stream(count), as_example, **{
        "micro_batch_size": 3, "seed": 7, "pad_id": -1, "block_size": 8, **kwargs})


def rows_of(window) -> list[list[int]]:
    """The distinct row ids of each micro-batch, in order."""
    out = []
    for batch in window:
        ids = batch["input_ids"][batch["attention_mask"].bool()].tolist()
        out.append(list(dict.fromkeys(ids)))
    return out


def steps(run_dir):
    return [m for m in read_metrics(run_dir / "metrics.jsonl") if "loss" in m]


@pytest.mark.parametrize("packing", [False, True])
def test_a_reloaded_position_continues_with_the_same_batches(packing):
    whole = stream(pack_len=8 if packing else 0)
    windows = [rows_of(whole.next_window(2)) for _ in range(12)]  # past the end: a 2nd pass
    for cut in (1, 3, 5, 9):  # inside a block, at other offsets, in the second pass
        first = stream(pack_len=8 if packing else 0)
        for _ in range(cut):
            first.next_window(2)
        saved = json.loads(json.dumps(first.state_dict()))  # as a checkpoint holds it
        resumed = stream(pack_len=8 if packing else 0)
        resumed.load_state_dict(saved)
        assert [rows_of(resumed.next_window(2)) for _ in range(12 - cut)] == windows[cut:], cut
    assert whole.epoch >= 1  # the windows reached into a later pass


def test_every_row_comes_once_per_pass_in_a_shuffled_order():
    s = stream(count=48, micro_batch_size=4)
    seen = [i for _ in range(12) for batch in rows_of(s.next_window(1)) for i in batch]
    assert sorted(seen) == list(range(48))
    assert seen != list(range(48))
    # each block of 8 rows is shuffled within itself
    assert [sorted(seen[k:k + 8]) for k in range(0, 48, 8)] == \
        [list(range(k, k + 8)) for k in range(0, 48, 8)]
    again = [i for _ in range(12) for batch in rows_of(s.next_window(1)) for i in batch]
    assert sorted(again) == list(range(48)) and again != seen  # the next pass, shuffled anew


@pytest.mark.parametrize("packing", [False, True])
def test_two_ranks_take_their_blocks_of_the_one_global_order(packing):
    pack = 8 if packing else 0
    one = stream(pack_len=pack)
    ranks = [stream(pack_len=pack, rank=r, world_size=2) for r in range(2)]
    for _ in range(6):
        global_window = rows_of(one.next_window(4))
        mine = [rows_of(r.next_window(2)) for r in ranks]
        assert mine[0] + mine[1] == global_window
        assert mine[0] and mine[1] and not set(sum(mine[0], [])) & set(sum(mine[1], []))
    assert ranks[0].state_dict() == ranks[1].state_dict() == one.state_dict()


def test_held_out_rows_are_never_trained_on():
    s = stream(count=30, held_out=6, micro_batch_size=4)
    seen = {i for _ in range(20) for batch in rows_of(s.next_window(1)) for i in batch}
    assert seen == set(range(6, 30))


def test_a_bad_row_is_reported_with_its_place_in_the_stream():
    from dtune.models import build_tiny_tokenizer

    cfg = compose(*TINY, "+method=lora", "data.streaming=true", "train.max_steps=2")
    rows = [{"messages": [{"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "yo"}]}] * 5
    rows.append({"messages": [{"role": "user", "content": "no answer"}]})
    s = StreamingBatches(lambda: datasets.Dataset.from_list(rows).to_iterable_dataset(),
                         example_maker(cfg, build_tiny_tokenizer(512), "chat"),
                         micro_batch_size=6, seed=0, pad_id=0, block_size=100)
    with pytest.raises(DtuneError, match=r"row 6 of its pass: the conversation has no assistant"):
        s.next_window(1)


def test_streaming_without_max_steps_is_refused_before_launch():
    with pytest.raises(DtuneError, match=r"data.streaming=true needs train.max_steps.*"
                                         r"train.max_steps=10000"):
        compose(*TINY, "+method=lora", "data.streaming=true", "train.max_steps=-1")


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    from dtune.data.builtin import generate

    records, _ = generate(["add", "reverse_words"], 30, 0, seed=3)
    path = tmp_path_factory.mktemp("stream") / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in records))
    return path


def test_a_resumed_streaming_run_gives_bitwise_the_losses_of_an_uninterrupted_one(
        tmp_path, chat_file):
    # 30 rows, 6 held out for eval, blocks of 5: the checkpoint at step 4 (16 rows in) sits
    # inside a block, and the second pass starts after it.
    common = (*TINY, "+method=lora", f"data.path={chat_file}", "data.streaming=true",
              "data.shuffle_buffer=5", "data.eval_fraction=0.1", "eval.max_loss_samples=6",
              "eval.exact_match_samples=0", "train.max_steps=8", "train.save_every=4")
    result = run(compose(*common), tmp_path / "whole")
    assert result.summary["eval_loss"] is not None
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "whole", cut)
    shutil.rmtree(cut / "checkpoints" / "step-8")
    shutil.rmtree(cut / "final")
    (cut / "checkpoints" / "latest").write_text("step-4")
    state = json.loads((cut / "checkpoints" / "step-4" / "trainer_state.json").read_text())
    assert state["data"]["epoch"] == 0 and state["data"]["offset"] > 0  # mid-block
    resumed = run(compose(*common, "train.resume=true"), cut)
    assert resumed.summary["resumed_from"].endswith("step-4")
    assert [m["step"] for m in steps(cut)] == list(range(1, 9))
    assert [m["loss"] for m in steps(cut)] == [m["loss"] for m in steps(tmp_path / "whole")]
    assert steps(cut)[-1]["epoch"] == 1  # the stream wrapped around after the resume
