"""Long context. Sequence parallelism (dtune/sequence_parallel.py): shards on the host, loss
and gradients on 2 gloo processes equal to one process on the whole sequence, the recipe end
to end (the `dtune check` row), and the refusals. RoPE scaling; the tiled MLP and activation
offload (dtune/long_context.py)."""
from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from conftest import TINY, compose
from dtune.data.batching import collate, collate_packed, loss_token_count
from dtune.data.formatting import IGNORE, Example
from dtune.errors import DtuneError
from dtune.sequence_parallel import check_heads, segment_causal_mask, shard_batch


def examples(lengths, seed=0):
    """Examples of random tokens whose first half is prompt (no loss)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(1, 100, (n,), generator=g).tolist()
        out.append(Example(ids, [IGNORE] * (n // 2) + ids[n // 2:]))
    return out


PADDED = collate(examples([13, 7, 10]), pad_id=0)
PACKED = collate_packed([examples([5, 6], 1), examples([9], 2)], pad_id=0)


@pytest.mark.parametrize("batch", [PADDED, PACKED], ids=["padded", "packed"])
@pytest.mark.parametrize("size", [2, 3])
def test_shards_put_back_together_are_the_batch(batch, size):
    shards = [shard_batch(batch, size, r, pad_id=0) for r in range(size)]
    length = batch["input_ids"].size(1)
    ids = torch.cat([s["input_ids"] for s in shards], 1)
    assert ids.size(1) % size == 0 and torch.equal(ids[:, :length], batch["input_ids"])
    assert (ids[:, length:] == 0).all()  # the padding up to a multiple of size
    positions = torch.cat([s["position_ids"] for s in shards], 1)[:, :length]
    expected = batch.get("position_ids", torch.arange(length).expand_as(batch["input_ids"]))
    assert torch.equal(positions, expected)
    # shard r's labels[:, 1:] are the targets of its tokens: the batch's labels shifted by one
    targets = torch.cat([s["labels"][:, 1:] for s in shards], 1)
    assert torch.equal(targets[:, :length - 1], batch["labels"][:, 1:])
    assert (targets[:, length - 1:] == IGNORE).all()
    # each loss-carrying token is counted once over the group; real tokens too
    assert sum(loss_token_count(s) for s in shards) == loss_token_count(batch)
    assert sum(int(s["attention_mask"].sum()) for s in shards) == int(
        batch["attention_mask"].sum())
    for s in shards:
        assert s["label_positions"].numel() == loss_token_count(s)


def test_the_gathered_mask_keeps_packed_examples_apart():
    mask = segment_causal_mask(torch.tensor([[0, 1, 2, 0, 1, 0]]))[0, 0]
    assert mask[2, :3].all() and not mask[3, :3].any() and mask[4, 3:5].all()
    assert not mask[5, :5].any() and mask[5, 5] and not mask.triu(1).any()


def test_heads_that_do_not_split_are_refused():
    from transformers import LlamaConfig

    config = LlamaConfig(num_attention_heads=6, num_key_value_heads=3, hidden_size=48)
    check_heads(config, 3, "m")  # 6 heads, 3 kv heads: 3 ranks take 2 and 1
    check_heads(config, 6, "m")  # 6 ranks: each kv head replicated twice
    with pytest.raises(DtuneError) as refused:
        check_heads(config, 4, "m")
    text = str(refused.value)
    assert "parallelism.sequence_parallel=4" in text and "6 attention heads" in text \
        and "3 key/value heads" in text and "such as 3" in text


# --- loss and gradients on 2 processes ----------------------------------------------------

def tiny_model(method: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=96, vocab_size=100, max_position_embeddings=128,
        attn_implementation="sdpa"))
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                 target_modules=["q_proj", "v_proj", "up_proj"],
                                                 init_lora_weights=False))
    return model.train()


def loss_and_grads(model, batch):
    from dtune.loss import summed_token_loss

    model.zero_grad()
    loss = summed_token_loss(model, batch)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
    return loss.detach(), grads


def parity_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from dtune import sequence_parallel
    from dtune.distributed import Ranks

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    results = {}
    for method in ("full", "lora"):
        for name, batch in (("padded", PADDED), ("packed", PACKED)):
            model = tiny_model(method)
            sp = sequence_parallel.set_up(model, 2, Ranks(rank, 2, rank), name == "packed",
                                          pad_id=0, name="tiny")
            loss, grads = loss_and_grads(model, sp.shard_window([batch])[0])
            # the engine's all-reduce adds the group's parts of the gradient
            dist.all_reduce(loss)
            dist.all_reduce(grads)
            whole_loss, whole_grads = loss_and_grads(tiny_model(method), batch)
            results[f"{method}-{name}"] = {
                "loss": loss.item(), "whole_loss": whole_loss.item(),
                "grad_diff": (grads - whole_grads).abs().max().item(),
                "grad_scale": whole_grads.abs().max().item()}
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_give_one_process_loss_and_gradients(tmp_path):
    """Full and LoRA, padded and packed: the group's summed loss and gradients on 2 gloo
    processes equal one process on the whole sequence (fp32, 1e-5)."""
    out = tmp_path / "results.json"
    mp.start_processes(parity_worker, args=(free_port(), str(out)), nprocs=2,
                       start_method="spawn")
    results = json.loads(out.read_text())
    assert set(results) == {"full-padded", "full-packed", "lora-padded", "lora-packed"}
    for case, r in results.items():
        assert r["loss"] == pytest.approx(r["whole_loss"], abs=1e-5 * r["whole_loss"]), case
        assert r["grad_diff"] <= 1e-5 * max(r["grad_scale"], 1.0), (case, r)
        assert r["grad_scale"] > 0, case


# --- the recipe end to end ------------------------------------------------------------------

def test_dtune_check_row_splits_sequences_on_two_ranks(tmp_path):
    """`dtune check`'s sequence-parallel row: `python -m dtune` with ddp on 2 ranks and
    parallelism.sequence_parallel=2 follows one process step for step (fp32); so do ZeRO-3
    (with gradient checkpointing: the exchange runs again in the recomputed forward; and the
    MLP in tiles, checkpointed within the layer's checkpoint) and FSDP2, whose parameter
    gathering is independent of the exchange of activations. The run then resumes on one
    process, whose global batch is the same."""
    from dtune.parity import Layout, run_check, step_losses, train_layout

    (result,) = run_check(tmp_path, steps=3, only=["ddp 2 ranks, sequences split in 2"])
    assert result.passed, (result.max_abs_diff, result.tolerance)
    split = tmp_path / "ddp_2_ranks,_sequences_split_in_2"
    one = step_losses(tmp_path / "1_process")
    assert step_losses(split) == pytest.approx(one, abs=1e-5)
    for name, extra in (("zero3", ["train.gradient_checkpointing=true", "train.mlp_tiles=3"]),
                        ("fsdp2", [])):
        layout = Layout(f"{name} split", [f"parallelism={name}", "parallelism.nproc_per_node=2",
                                          "parallelism.sequence_parallel=2",
                                          "train.micro_batch_size=4", *extra])
        assert train_layout(layout, tmp_path, steps=3) == pytest.approx(one, abs=1e-4), name
    summary = json.loads((split / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch_size"] == 4
    assert "2 ranks per sequence" in (split / "dtune.log").read_text()
    before = step_losses(split)
    resumed = train_layout(Layout(result.candidate, ["parallelism=single",
                                                     "train.micro_batch_size=4",
                                                     "train.resume=true"]), tmp_path, steps=5)
    assert resumed[:3] == before and len(resumed) == 5


# --- refusals, before anything loads --------------------------------------------------------

# the process count and the objectives: tests/test_bad_inputs.py's catalogue (and
# tests/test_settle.py, before any job is submitted)
@pytest.mark.parametrize("overrides, fragments", [
    (["parallelism.sequence_parallel=2"], ["parallelism=single runs 1 process(es)"]),
    (["parallelism=ddp", "parallelism.nproc_per_node=2", "parallelism.sequence_parallel=2",
      "+method=prompt_tuning"], ["+method=prompt_tuning", "first shard"]),
    (["parallelism=ddp", "parallelism.nproc_per_node=2", "parallelism.sequence_parallel=2",
      "model.attn_implementation=eager"], ["model.attn_implementation=eager", "sdpa"]),
    (["parallelism.sequence_parallel=0"], ["parallelism.sequence_parallel"]),
], ids=["single", "soft-prompt", "eager", "zero"])
def test_what_cannot_split_is_refused_before_loading(overrides, fragments):
    with pytest.raises(DtuneError) as refused:
        compose(*TINY, *overrides)
    for fragment in fragments:
        assert fragment in str(refused.value), str(refused.value)


def test_rope_scaling_reaches_the_model_and_stretches_its_context():
    """tiny-llama has 1024 positions: 2048 is refused, unless model.rope_scaling says how to
    stretch them, which then reaches the model's config and its rotary frequencies."""
    from dtune.models import load_model_and_tokenizer
    from dtune.train import check_context_length

    plain = compose(*TINY, "data.max_seq_len=2048")
    model, _, _ = load_model_and_tokenizer(plain.model)
    with pytest.raises(DtuneError, match=r"model.rope_scaling=\{rope_type:linear,factor:2\}"):
        check_context_length(plain, model)
    stretched = compose(*TINY, "data.max_seq_len=2048",
                        "model.rope_scaling={rope_type:linear,factor:2}")
    scaled, _, _ = load_model_and_tokenizer(stretched.model)
    assert scaled.config.rope_parameters["rope_type"] == "linear"
    assert scaled.config.rope_parameters["factor"] == 2
    check_context_length(stretched, scaled)
    positions = torch.arange(8)[None]
    x = torch.zeros(1, 8, 64)
    cos_plain, _ = model.model.rotary_emb(x, positions)
    cos_scaled, _ = scaled.model.rotary_emb(x, 2 * positions)
    torch.testing.assert_close(cos_plain, cos_scaled)  # position 2p stretched = p plain
    with pytest.raises(DtuneError, match="data.max_seq_len<=2048"):
        check_context_length(compose(*TINY, "data.max_seq_len=4096",
                                     "model.rope_scaling={rope_type:linear,factor:2}"), scaled)
    with pytest.raises(DtuneError, match="finite factor"):
        compose(*TINY, "model.rope_scaling={rope_type:linear,factor:0.5}")


def saved_bytes(model, batch) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(bytes autograd saves in the forward for backward, the loss, the gradients)."""
    from dtune.loss import summed_token_loss

    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    model.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = summed_token_loss(model, batch)
    loss.backward()
    return sum(saved), loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])


def test_the_mlp_in_tiles_gives_the_same_gradients_and_saves_less():
    from dtune.long_context import tile_mlp

    batch = collate(examples([60, 64]), pad_id=0)
    whole_bytes, whole_loss, whole_grads = saved_bytes(tiny_model("full"), batch)
    model = tiny_model("full")
    tile_mlp(model, 4, "tiny")
    tiled_bytes, loss, grads = saved_bytes(model, batch)
    torch.testing.assert_close(loss, whole_loss, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(grads, whole_grads, rtol=1e-5, atol=1e-6)
    # forward keeps each layer's MLP input (its tiles), not its three [tokens x 96] tensors
    assert tiled_bytes < 0.8 * whole_bytes, (tiled_bytes, whole_bytes)
    model.eval()
    with torch.no_grad():  # generation and eval run the MLP whole
        assert model(batch["input_ids"]).logits.shape[1] == batch["input_ids"].shape[1]


def test_activations_go_to_host_memory_only_from_a_gpu():
    from dtune.long_context import saved_activations

    assert not isinstance(saved_activations(True, torch.device("cpu")),
                          torch.autograd.graph.save_on_cpu)
    assert not isinstance(saved_activations(False, torch.device("cuda", 0)),
                          torch.autograd.graph.save_on_cpu)
    assert isinstance(saved_activations(True, torch.device("cuda", 0)),
                      torch.autograd.graph.save_on_cpu)


def test_the_planner_counts_a_ranks_share_of_the_sequence_and_each_switch():
    from dtune.plan import estimate, layouts, longest_context, model_shape, with_settings

    cfg = compose(*TINY, "+method=full", "data.max_seq_len=1024", "train.loss_chunk_size=0")
    shape, ddp = model_shape(cfg), layouts()["ddp"]

    def activations(**settings):
        planned = with_settings(cfg, settings)
        return estimate(planned, shape, ddp, 2, on_gpu=True).activations

    whole = activations()
    # half of each row per rank: every activation, the logits too, halves
    assert activations(**{"parallelism.sequence_parallel": 2}) == pytest.approx(whole / 2, rel=0.01)
    assert activations(**{"train.mlp_tiles": 8}) < whole
    assert activations(**{"train.gradient_checkpointing": True}) < whole
    assert activations(**{"train.offload_activations": True}) < whole
    # a CPU run keeps its activations where they are
    offloaded = with_settings(cfg, {"train.offload_activations": True})
    assert estimate(offloaded, shape, ddp, 2, on_gpu=False).activations == \
        estimate(cfg, shape, ddp, 2, on_gpu=False).activations
    cap = int(1.5 * estimate(cfg, shape, ddp, 2, on_gpu=False).total)
    longest = longest_context(cfg, shape, ddp, 2, False, cap)
    split = longest_context(with_settings(cfg, {"parallelism.sequence_parallel": 2}), shape, ddp,
                            2, False, cap)
    assert longest >= 1024 and split > 1.8 * longest
    planned = with_settings(cfg, {"data.max_seq_len": longest})
    assert estimate(planned, shape, ddp, 2, False).total <= cap
    planned = with_settings(cfg, {"data.max_seq_len": longest + 256})
    assert estimate(planned, shape, ddp, 2, False).total > cap


def test_find_value_plants_its_answer_at_every_depth_of_a_long_document():
    from dtune.data import builtin

    train, held = builtin.generate(["find_value"], 200, 20, seed=0,
                                   options=builtin.TaskOptions(document_lines=50))
    depths = []
    for record in train + held:
        document, question = record["messages"][1]["content"].split("\n\n")
        lines = document.split("\n")
        assert len(lines) == 50
        key = question.removeprefix("What code does the ").removesuffix(" hold?")
        (depth,) = [i for i, line in enumerate(lines) if f"The {key} holds" in line]
        assert lines[depth].endswith(f"code {record['messages'][2]['content']}.")
        depths.append(depth / 50)
    assert min(depths) < 0.1 and max(depths) > 0.9  # near the start and near the end
    cfg = compose(*TINY, "data=builtin_long", "data.builtin.document_lines=8",
                  "data.max_seq_len=1024")
    assert list(cfg.data.builtin.tasks) == ["find_value"]
    with pytest.raises(DtuneError, match="data.builtin.document_lines=1"):
        compose(*TINY, "data.builtin.document_lines=1")
