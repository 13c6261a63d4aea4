"""data.chat_template and the pad token: a base model without a template trains with a bundled
one or a .jinja file, `final/` carries it to eval/generate/merge, and a tokenizer without a pad
token gets one from its own vocabulary."""
import json
import shutil

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from conftest import TINY, compose, train
from dtune.data.formatting import IGNORE, prompt_and_reference, render, tokenize
from dtune.errors import DtuneError
from dtune.models import build_tiny_tokenizer, load_model_and_tokenizer
from dtune.tokenizer_setup import BUNDLED, TEMPLATE_DIR, choose_pad_token, set_up_tokenizer

CONVERSATION = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "4"},
                {"role": "user", "content": "And 3+3?"},
                {"role": "assistant", "content": "6"}]


def tiny_tokenizer_with(*tokens):
    tokenizer = build_tiny_tokenizer(512)
    tokenizer.chat_template = None
    tokenizer.add_special_tokens({"additional_special_tokens": list(tokens)})
    return tokenizer


@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_each_bundled_template_renders_prefix_by_prefix_and_trains_every_answer(name):
    tokenizer = tiny_tokenizer_with(*BUNDLED[name].tokens)
    set_up_tokenizer(tokenizer, name)
    assert tokenizer.chat_template == (TEMPLATE_DIR / f"{name}.jinja").read_text()
    text, spans = render({"messages": CONVERSATION}, "chat", tokenizer)
    trained = [text[a:b] for a, b in spans]
    end = BUNDLED[name].end_of_turn or tokenizer.eos_token
    assert [t.strip().startswith(answer) for t, answer in zip(trained, "46")] == [True, True]
    assert all(end in t for t in trained)  # the model learns to end its turn
    assert tokenizer.eos_token == end  # and generation stops there
    example = tokenize({"messages": CONVERSATION}, "chat", tokenizer, 256, False)
    labelled = tokenizer.decode([t for t in example.labels if t != IGNORE])
    assert "4" in labelled and "6" in labelled and "2+2" not in labelled


def test_an_unknown_name_or_a_missing_file_names_the_setting_and_the_bundled_templates(tmp_path):
    tokenizer = tiny_tokenizer_with()
    for value in ("chatmlx", str(tmp_path / "missing.jinja")):
        with pytest.raises(DtuneError) as caught:
            set_up_tokenizer(tokenizer, value)
        message = str(caught.value)
        assert f"data.chat_template={value!r}" in message
        assert "chatml, llama3, zephyr" in message and ".jinja file" in message
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}\n{{ m['content'] }\n")
    with pytest.raises(DtuneError, match=r"bad.jinja'?: line 2 is not valid Jinja"):
        set_up_tokenizer(tokenizer, str(bad))


def test_a_template_whose_markers_the_vocabulary_lacks_is_refused_not_added():
    tokenizer = tiny_tokenizer_with()  # has <|im_start|> and <|im_end|>, no Llama-3 headers
    size = len(tokenizer)
    with pytest.raises(DtuneError) as caught:
        set_up_tokenizer(tokenizer, "llama3")
    message = str(caught.value)
    assert "<|start_header_id|>, <|end_header_id|>, <|eot_id|>" in message
    assert "fits (chatml, zephyr)" in message
    assert len(tokenizer) == size


def word_level_tokenizer(specials: list[str], **roles) -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate([*specials, "a", "b"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=roles.get("unk_token")))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **roles)
    tokenizer.add_special_tokens({"additional_special_tokens": [
        t for t in specials if t not in roles.values()]})
    return tokenizer


@pytest.mark.parametrize("specials, roles, expected", [
    (["</s>", "<unk>", "<|reserved_0|>", "[PAD]"], {"unk_token": "<unk>"}, "[PAD]"),
    (["</s>", "<unk>", "<|reserved_special_token_0|>"], {"unk_token": "<unk>"},
     "<|reserved_special_token_0|>"),
    (["</s>", "<unk>"], {"unk_token": "<unk>"}, "<unk>"),
    (["</s>"], {}, "</s>"),
])
def test_a_missing_pad_token_comes_from_the_vocabulary_never_a_new_token(specials, roles,
                                                                        expected):
    tokenizer = word_level_tokenizer(specials, eos_token="</s>", **roles)
    size = len(tokenizer)
    assert tokenizer.pad_token is None
    assert choose_pad_token(tokenizer) == expected
    set_up_tokenizer(tokenizer)
    assert tokenizer.pad_token == expected and len(tokenizer) == size


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    """The tiny model as a base model ships: no chat template, no pad token."""
    from conftest import compose as compose_config
    from dtune.models import resolve_model

    built, _ = resolve_model(compose_config(*TINY, "+method=lora").model)
    folder = tmp_path_factory.mktemp("base") / "tiny-base"
    shutil.copytree(built, folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    config.pop("pad_token", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def base(folder, *overrides):
    return (*TINY, "+method=lora", f"model.name_or_path={folder}", "model.random_init=null",
            "eval.exact_match_samples=2", *overrides)


def test_a_base_model_loads_without_template_or_pad_and_gets_them_without_resizing(
        base_folder):
    plain_cfg = compose(*base(base_folder))
    model, tokenizer, _ = load_model_and_tokenizer(plain_cfg.model)
    assert tokenizer.chat_template is None
    assert tokenizer.pad_token == "<|pad|>"  # the vocabulary's own, unused special token
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    cfg = compose(*base(base_folder, "data.chat_template=chatml"))
    _, chatml, _ = load_model_and_tokenizer(cfg.model, chat_template="chatml")
    assert chatml.chat_template == (TEMPLATE_DIR / "chatml.jinja").read_text()
    _, zephyr, _ = load_model_and_tokenizer(cfg.model, chat_template="zephyr")
    # Set as the tokenizer loads, before anything tokenizes: the cache key
    # (dtune/data/prepare.py fingerprint) reads tokenizer.chat_template, so it is never stale.
    assert zephyr.chat_template == (TEMPLATE_DIR / "zephyr.jinja").read_text()


def test_without_a_template_chat_data_is_refused_pointing_at_data_chat_template(
        tmp_path, base_folder):
    with pytest.raises(DtuneError, match=r"data.chat_template=chatml"):
        train(tmp_path, *base(base_folder, "train.max_steps=1"))


def test_the_template_trains_and_reaches_eval_generate_and_merge_through_final(
        tmp_path, base_folder):
    from dtune.load_run import load_final_model, load_tokenizer

    template = tmp_path / "mine.jinja"
    template.write_text((TEMPLATE_DIR / "chatml.jinja").read_text().replace("\\n", "\\n\\n"))
    run_dir = tmp_path / "run"
    result = train(run_dir, *base(base_folder, f"data.chat_template={template}",
                                  "train.max_steps=2", "train.save_every=1"))
    assert result.summary["exact_match_after"] is not None
    model, tokenizer, cfg = load_final_model(run_dir)  # what dtune eval and generate load
    assert tokenizer.chat_template == template.read_text()
    assert tokenizer.pad_token == "<|pad|>"
    record = {"messages": CONVERSATION}
    assert prompt_and_reference(record, "chat", tokenizer) == \
        prompt_and_reference(record, "chat", result.tokenizer)
    assert load_tokenizer(run_dir / "final").chat_template == template.read_text()  # merge's
    saved = json.loads((run_dir / "checkpoints" / "step-2" / "trainer_state.json").read_text())
    assert saved["chat_template"] == template.read_text()
    # Resuming with another template would train on with other token ids: refused.
    with pytest.raises(DtuneError, match=r"data.chat_template: .*mine.jinja' in the checkpoint, "
                                         r"'chatml' now"):
        train(run_dir, *base(base_folder, "data.chat_template=chatml", "train.max_steps=3",
                             "train.resume=true"))
