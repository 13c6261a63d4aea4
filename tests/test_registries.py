"""One registry per axis: each spec dict is the one list of its names. The options a user can
pick (conf/<group>/*.yaml) are exactly the registry's keys, and a name the registry lacks is
refused before anything loads, in one paragraph that lists the registry's names."""
import pytest

from conftest import TINY, compose
from dtune.compose import conf_group
from dtune.engines import ENGINES
from dtune.errors import DtuneError
from dtune.methods import METHODS
from dtune.objectives import OBJECTIVES
from dtune.tracking import TRACKERS


@pytest.mark.parametrize("group, registry", [
    ("method", METHODS), ("objective", OBJECTIVES), ("tracker", TRACKERS)])
def test_each_registry_holds_exactly_the_options_of_its_config_group(group, registry):
    options = conf_group(group)
    assert set(options) == set(registry)
    for name, node in options.items():  # each file selects its own spec
        assert node.get("name", name) == name


def test_the_parallelism_layouts_name_exactly_the_registered_engines():
    layouts = {name: node for name, node in conf_group("parallelism").items() if name != "auto"}
    assert all("engine" in node for node in layouts.values()), "every layout names its engine"
    assert {node.engine for node in layouts.values()} == set(ENGINES)
    for name, node in layouts.items():  # and each layout passes its engine's own check
        ENGINES[node.engine].check(compose(*TINY, f"parallelism={name}").parallelism)


@pytest.mark.parametrize("overrides, key, value", [
    (["objective.name=kto"], "objective.name", "'kto'"),
    (["tracker.name=mlflow"], "tracker.name", "'mlflow'"),
    (["parallelism=ddp", "parallelism.engine=fsdp9"], "parallelism.engine", "'fsdp9'"),
])
def test_a_name_outside_its_registry_is_refused_in_one_paragraph(overrides, key, value):
    with pytest.raises(DtuneError) as refused:
        compose(*TINY, *overrides)
    message = str(refused.value)
    registry = {"objective.name": OBJECTIVES, "tracker.name": TRACKERS,
                "parallelism.engine": ENGINES}[key]
    assert "\n" not in message
    assert message == (f"{key}={value} is not supported; choose one of "
                       f"{', '.join(registry)}.")


@pytest.mark.parametrize("overrides, fragments", [
    (["parallelism=ddp", "parallelism.engine=deepspeed"],
     ["parallelism.engine=deepspeed", "parallelism=zero1, zero2 or zero3"]),
    (["parallelism=zero2", "parallelism.engine=torch"],
     ["parallelism.zero_stage=2", "parallelism.engine=torch", "parallelism=zero2"]),
    (["parallelism=fsdp2", "parallelism.zero_stage=3"],
     ["parallelism.zero_stage=3", "parallelism.engine=fsdp2", "parallelism=zero3"]),
])
def test_an_engine_refuses_a_layout_it_cannot_run(overrides, fragments):
    with pytest.raises(DtuneError) as refused:
        compose(*TINY, *overrides)
    message = str(refused.value)
    assert "\n" not in message and all(f in message for f in fragments), message


def test_config_checks_load_no_torch():
    """The registries are read at config-check time, before torch loads (a typo is refused at
    once): importing the schema, the checks and the engine registry imports no torch."""
    import subprocess
    import sys

    probe = ("import dtune.config, dtune.compose, dtune.engines, sys; "
             "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "False"
