"""The test tiers (#23): tests/conftest.py marks each test by what it starts, read from its
source and from the helpers and constants it names. `e2e` starts `python -m dtune`,
`multiprocess` several training processes; what is neither (nor slow nor slurm) is `fast`."""
import pytest

import test_bad_inputs
import test_distributed
import test_docs
import test_families
import test_reliability
import test_signals
from conftest import E2E_SOURCE, MULTIPROCESS_SOURCE, _reached_source


# test_reliability's layouts, by id: written in the parametrize list, the DDP one would mark
# the case below itself multiprocess (a case's parameters speak for it)
kill_layouts = {"single": [], "ddp2": ["parallelism=ddp", "parallelism.nproc_per_node=2"]}


def tiers(function, layout=None) -> set[str]:
    params = {"layout": kill_layouts[layout]} if layout else None
    source = _reached_source(function) + "\n" + repr(params)
    return ({"e2e"} if E2E_SOURCE.search(source) else set()) | \
        ({"multiprocess"} if MULTIPROCESS_SOURCE.search(source) else set())


@pytest.mark.parametrize("function, layout, expected", [
    # in-process unit tests: a config naming two processes starts none
    (test_families.test_dtune_loss_is_the_models_own_forward_loss, None, set()),
    (test_distributed.test_slurm_variables_map_to_ranks_and_master, None, set()),
    (test_distributed.test_nodelist_expansion, None, set()),
    # a CLI run, seen through a helper (run_dtune; the README's argv built in a helper)
    (test_bad_inputs.test_bad_input_gets_one_clear_paragraph, None, {"e2e"}),
    (test_docs.test_a_readme_command_runs_as_written, None, {"e2e"}),
    (test_signals.test_sigterm_checkpoints_explains_and_resumes_to_the_same_losses, None,
     {"e2e"}),
    # several processes: by the case's parameters, by dtune.parity's layouts, by a kill
    (test_reliability.test_kill_9_after_a_checkpoint_resumes_bitwise, "single",
     {"e2e", "multiprocess"}),
    (test_reliability.test_kill_9_after_a_checkpoint_resumes_bitwise, "ddp2",
     {"e2e", "multiprocess"}),
    (test_distributed.test_parity_of_every_layout, None, {"e2e", "multiprocess"}),
    (test_signals.test_sigterm_under_ddp_checkpoints_every_rank_and_resumes_to_the_same_losses,
     None, {"e2e", "multiprocess"}),
])
def test_each_test_is_marked_by_what_it_starts(function, layout, expected):
    assert tiers(function, layout) == expected, _reached_source(function)[-3000:]


def test_the_markers_reach_the_collected_tests(request):
    """This test starts nothing, so it is fast; the markers are registered (no warning)."""
    names = {mark.name for mark in request.node.iter_markers()}
    assert "fast" in names and not names & {"e2e", "multiprocess", "slow", "slurm"}
    registered = "\n".join(request.config.getini("markers"))
    for marker in ("fast", "e2e", "multiprocess", "slow", "slurm"):
        assert f"{marker}:" in registered
