"""Config composition and validation: what users type must compose, typos must be refused."""
import pytest

from conftest import compose, one_line, run_dtune
from dtune.compose import check_overrides
from dtune.errors import DtuneError


def test_default_config_is_lora_on_smollm2_with_builtin_data():
    cfg = compose()
    assert cfg.method.name == "lora"
    assert cfg.model.name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert cfg.data.path == "builtin"
    assert cfg.precision.name == "fp32" and cfg.parallelism.name == "single"  # auto, settled
    assert cfg.settled.machine.startswith("this machine (CPU")


@pytest.mark.parametrize("method", ["full", "lora"])
def test_plus_method_selects_the_method_group(method):
    cfg = compose(f"+method={method}", "model=tiny-llama")
    assert cfg.method.name == method
    assert cfg.model.random_init is not None


def test_plus_method_group_values_win_over_primary_defaults():
    cfg = compose("+method=lora", "method.r=4")
    assert cfg.method.r == 4


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


# What the CLI must name when it refuses each (the method without its plus; bad configs).
CLI_REFUSALS = [
    ("method=lora", ["+method=lora"]),
    ("train.lrr=1", ["train.lrr", "Did you mean train.lr"]),
    ("train.lr=abc", ["train.lr", "abc"]),
    ("train.lr=-1", ["train.lr=-1.0", "> 0"]),
    ("train.micro_batch_size=0", ["train.micro_batch_size=0", "> 0"]),
    ("data.format=xml", ["data.format='xml'", "alpaca, chat, text"]),
    ("model=gpt-17", ["model/gpt-17", "tiny-llama"]),
]


def test_cli_refuses_bad_config_with_one_message_and_no_traceback():
    """tests/test_bad_inputs.py runs each as `python -m dtune model=tiny-llama ... OVERRIDE`
    and checks a non-zero exit, no traceback and every fragment its case expects: these are
    among them (running them here too would start the same seven processes twice)."""
    import test_bad_inputs

    expected = {tuple(case.overrides): case.expect for case in test_bad_inputs.CASES
                if case.module and not case.files}
    for override, must_name in CLI_REFUSALS:
        assert (override,) in expected, override
        for text in must_name:
            assert any(text in fragment for fragment in expected[(override,)]), (override, text)


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


def test_an_optional_section_of_the_chosen_model_takes_overrides():
    """The tiny model's random_init section exists, so Hydra sets its keys (bench/gpu_check.sh
    builds its model this way)."""
    cfg = compose("model=tiny-llama", "model.random_init.hidden_size=512",
                  "model.random_init.num_heads=8")
    assert cfg.model.random_init.hidden_size == 512 and cfg.model.random_init.num_heads == 8
    check_overrides(["model=tiny-llama", "model.random_init.hidden_size=512"])


def test_overriding_a_section_the_model_leaves_null_says_which_config_has_it():
    with pytest.raises(DtuneError) as caught:
        check_overrides(["model.random_init.hidden_size=512"])
    message = str(caught.value)
    assert "'model.random_init.hidden_size=512'" in message
    assert "model.random_init, which is null" in message and "model=tiny-llama" in message


@pytest.mark.parametrize("override, key", [
    ("hydra.callbacks.sweep_results._target_=launchers.results.SweepResults",
     "hydra.callbacks.sweep_results._target_"),
    ("launcher._target_=launchers.slurm.submit", "launcher._target_"),
])
def test_a_config_naming_the_old_launchers_path_gets_the_new_one(override, key):
    result = run_dtune("model=tiny-llama", override)
    message = one_line(result.stderr)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert key in message and "dtune.launchers." in message


def test_sweep_overrides_are_checked_by_their_first_value():
    check_overrides(["train.lr=1e-4,3e-4", "model=tiny-llama"])
    check_overrides(["train.lr=interval(1e-5,1e-2)"])  # interval sweeps: the sweeper's to check
    with pytest.raises(DtuneError, match="Did you mean train.lr"):
        check_overrides(["train.lrr=1e-4,3e-4"])


def test_free_form_mappings_take_the_users_keys_as_the_readme_writes_them():
    """data.columns, launcher.sbatch_extra and parallelism.deepspeed_overrides hold keys the
    schema cannot know; Hydra's struct mode refused every one of them before."""
    cfg = compose("data=file", "data.path=rows.jsonl", "data.format=alpaca",
                  "data.columns={instruction: question, output: answer}",
                  "launcher.sbatch_extra={exclusive: true}",
                  "parallelism.deepspeed_overrides={zero_optimization: {reduce_bucket_size: 5}}")
    assert cfg.data.columns == {"instruction": "question", "output": "answer"}
    assert cfg.launcher.sbatch_extra == {"exclusive": True}
    assert cfg.parallelism.deepspeed_overrides == {"zero_optimization": {"reduce_bucket_size": 5}}
    with pytest.raises(DtuneError, match="unknown config key 'data.typo'"):
        compose("data.typo=3")  # the rest of the schema stays strict
