"""Finding models: clear refusals that say where dtune looked, and a reproducible tiny model."""
import pytest
import torch

from conftest import compose, one_line
from dtune.config import GgufConfig, ModelConfig
from dtune.errors import DtuneError
from dtune.models import load_model_and_tokenizer, resolve_model


def test_missing_local_model_names_every_place_looked(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DtuneError) as caught:
        resolve_model(ModelConfig(name="x", name_or_path="acme/no-such-model"))
    message = str(caught.value)
    assert "acme/no-such-model" in message
    assert "Hugging Face cache" in message and "HF_HUB_OFFLINE=1" in message


def test_missing_gguf_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = ModelConfig(name="x", name_or_path="acme/other-model",
                      gguf=GgufConfig(package="no_such_gguf_pkg", file="m.gguf",
                                      pip_spec="no-such-gguf-pkg==1.0"))
    with pytest.raises(DtuneError, match=r"pip install --no-deps no-such-gguf-pkg==1.0"):
        resolve_model(cfg)


def test_a_folder_without_config_is_refused(tmp_path):
    with pytest.raises(DtuneError, match="holds no config.json"):
        resolve_model(ModelConfig(name="x", name_or_path=str(tmp_path)))


def test_random_init_model_is_the_same_every_time():
    cfg = compose("model=tiny-llama").model
    first, tokenizer, _ = load_model_and_tokenizer(cfg)
    second, _, _ = load_model_and_tokenizer(cfg)
    for a, b in zip(first.parameters(), second.parameters()):
        assert torch.equal(a, b)
    assert tokenizer.chat_template and tokenizer.pad_token_id != tokenizer.eos_token_id
    text = "Convert 3.5 km to m. {\"name\": \"Ünïcode\"}"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text  # byte-level: any text


def test_a_random_init_vocabulary_past_what_the_bpe_learns_is_filled_with_unused_tokens():
    """The built-in corpus teaches the BPE about 2,200 tokens. A model asked for a realistic
    32k vocabulary has 32k embedding and LM-head rows all the same, and text encodes as the
    BPE alone encodes it; tiny-llama's 512 are all learnt, so nothing is added there."""
    from dtune.models import build_tiny_tokenizer

    model, tokenizer, _ = load_model_and_tokenizer(compose(
        "model=tiny-llama", "model.name_or_path=random-32k",
        "model.random_init.vocab_size=32000").model)
    assert len(tokenizer) == model.config.vocab_size == 32000
    assert model.get_input_embeddings().weight.shape[0] == 32000
    assert model.get_output_embeddings().weight.shape[0] == 32000
    learnt = min(i for t, i in tokenizer.get_vocab().items() if t.startswith("<|unused_"))
    assert 1000 < learnt < 32000
    text = "Convert 3.5 km to m. {\"name\": \"Ünïcode\"}"
    assert tokenizer(text)["input_ids"] == build_tiny_tokenizer(learnt)(text)["input_ids"]
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    _, tiny, _ = load_model_and_tokenizer(compose("model=tiny-llama").model)
    assert len(tiny) == 512 and not any(t.startswith("<|unused_") for t in tiny.get_vocab())


def test_a_random_init_build_from_before_the_fill_is_built_again(tmp_path):
    import json

    from dtune.config import RandomInitConfig
    from dtune.models import built_before_the_fill

    asked = RandomInitConfig(vocab_size=32000)
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 2183}))
    assert built_before_the_fill(tmp_path, asked)
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 32000}))
    assert not built_before_the_fill(tmp_path, asked)
    assert not built_before_the_fill(tmp_path / "absent", asked)


def test_remote_code_stays_off_unless_configured():
    assert compose().model.trust_remote_code is False


def test_another_model_named_on_the_command_line_never_loads_the_default_gguf(monkeypatch):
    """`model.name_or_path=Qwen/...` keeps the default group's GGUF section; offline, that
    file (SmolLM2) was converted and trained under Qwen's name."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = compose("model.name_or_path=acme/not-smollm2").model
    assert cfg.gguf is not None and cfg.gguf.holds  # the default group's section is still here
    with pytest.raises(DtuneError) as caught:
        resolve_model(cfg)
    message = one_line(str(caught.value))
    assert "acme/not-smollm2" in message and "was not found" in message
    assert "skipped: it holds HuggingFaceTB/SmolLM2-135M-Instruct" in message
