"""Config composition and validation: what users type must compose, typos must be refused."""
import pytest

from conftest import compose, one_line, run_dtune
from dtune.config import check_overrides
from dtune.errors import DtuneError


def test_default_config_is_lora_on_smollm2_with_builtin_data():
    cfg = compose()
    assert cfg.method.name == "lora"
    assert cfg.model.name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert cfg.data.path == "builtin"
    assert cfg.precision.name == "fp32" and cfg.parallelism.name == "single"


@pytest.mark.parametrize("method", ["full", "lora"])
def test_plus_method_selects_the_method_group(method):
    cfg = compose(f"+method={method}", "model=tiny-llama")
    assert cfg.method.name == method
    assert cfg.model.random_init is not None


def test_plus_method_group_values_win_over_primary_defaults():
    cfg = compose("+method=lora", "method.r=4")
    assert cfg.method.r == 4


def test_method_without_plus_tells_the_user_to_add_it():
    result = run_dtune("method=lora", "model=tiny-llama")
    assert result.returncode != 0
    assert "+method=lora" in result.stderr


@pytest.mark.parametrize(
    "override, must_name",
    [
        ("train.lrr=1", ["train.lrr", "train.lr"]),
        ("train.lr=abc", ["train.lr", "abc"]),
        ("data.max_seq_len=long", ["data.max_seq_len", "long"]),
        ("method.rank=8", ["method.rank", "method.r"]),
    ],
)
def test_bad_override_is_refused_before_anything_loads(override, must_name):
    with pytest.raises(DtuneError) as caught:
        check_overrides([override])
    for text in must_name:
        assert text in str(caught.value)


@pytest.mark.parametrize(
    "override, must_name",
    [
        ("train.lrr=1", ["train.lrr", "Did you mean train.lr"]),
        ("train.lr=abc", ["train.lr", "abc"]),
        ("train.lr=-1", ["train.lr=-1.0", "> 0"]),
        ("train.micro_batch_size=0", ["train.micro_batch_size=0", "> 0"]),
        ("data.format=xml", ["data.format='xml'", "alpaca, chat, text"]),
        ("model=gpt-17", ["model/gpt-17", "tiny-llama"]),
    ],
)
def test_cli_refuses_bad_config_with_one_message_and_no_traceback(override, must_name):
    result = run_dtune("model=tiny-llama", override)
    assert result.returncode != 0
    for text in must_name:
        assert text in one_line(result.stderr), result.stderr
    assert "Traceback" not in result.stderr


def test_full_error_env_shows_the_traceback():
    result = run_dtune("model=tiny-llama", "train.lr=-1", env={"HYDRA_FULL_ERROR": "1"})
    assert result.returncode != 0
    assert "Traceback" in result.stderr


def test_range_checks_run_when_composing():
    with pytest.raises(DtuneError, match="train.warmup_steps"):
        compose("train.warmup_steps=-3")
    with pytest.raises(DtuneError, match="method.dropout"):
        compose("method.dropout=1.5")
    with pytest.raises(DtuneError, match="train.max_steps"):
        compose("train.max_steps=0")
