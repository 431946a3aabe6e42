"""Shared test set-up: compile level and persistent compile cache, absl flags for grain, xdist
groups, real-data fixtures.

Real data is found through environment variables that `.ci/run` sets:
`JAXDESENS_ATT_DIR` (AT&T faces) and `JAXDESENS_LFW_PAIRS` (LFW pairs.txt). A test that needs
them fails when the variable is set but the data is missing, and is skipped only where the
variable is not set at all (a machine without the shared data).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

# The tests compile with LLVM's expensive passes off (JAX's `jax_disable_most_optimizations`: XLA's
# backend optimization level 0), as Flax's own tests of long-compiling models do: the HLO programs,
# their fusions and the library convolutions are the same, only the generated loops are less
# optimised. Compiling dominates this suite (tiny models, a few steps each). Measured, whole suite,
# two workers, empty compile cache, idle machine: 399 passed in 14 min 47 s and 1,525 CPU-s,
# against 21 min 30 s and 2,245 CPU-s at the default level (the multi-host test 178 -> 79 CPU-s;
# only the long AT&T trainings run slower: 248 -> 304). Set in the environment before JAX is
# imported, so every child process (the CLIs, Flower's ClientApps) compiles alike; a value already
# set is kept (`JAX_DISABLE_MOST_OPTIMIZATIONS=0 pytest` tests the default level). The few tests
# marked `compute_bound` compile at the default level instead (see `_compile_level`).
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax  # noqa: E402
import pytest  # noqa: E402
from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()  # grain reads absl flags; pytest never parses them

_CACHE = os.environ.get("JAXDESENS_TEST_CACHE", str(Path(__file__).resolve().parent.parent / ".cache" / "jax"))
jax.config.update("jax_compilation_cache_dir", _CACHE)
# Every compile, however short: the two xdist workers (and the tests' children) then share their
# small compiles instead of each making them (measured on 132 model/mask/EBP/wiring tests, -n 2, empty
# cache: 201 s wall, 375 CPU-s at 0 against 218 s, 396 CPU-s at 0.5).
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


# The suite runs on two pytest-xdist workers (`-n 2 --dist loadgroup`, the README's test command).
# A worker builds a session- or module-scoped fixture for itself, so the tests that share an
# expensive one are sent to one worker as an `xdist_group`: the AT&T models below (minutes of
# training) are one group, and the tests using a module's module-scoped fixtures are that module's
# group. The persistent compilation cache stays shared by the workers and their children: JAX
# writes an entry in place (not atomically), but a torn read fails zlib's checksum and is a
# cache miss (a warning and a recompile), and two writers of one key each write the whole
# compressed entry from offset 0, which decompresses whole (zlib ignores trailing bytes).
ATT_MODELS = frozenset({"att_clean_workdir", "att_mask_workdir", "att_fsm_workdir", "att_searched_mask"})


def _shared_fixture_group(item: pytest.Item) -> str | None:
    names = set(getattr(item, "fixturenames", ()))
    if names & ATT_MODELS:
        return "att_models"
    # pytest has no public way to ask a fixture's scope from an item; without this private
    # attribute the module groups are simply not made (slower, not wrong).
    definitions = getattr(item, "_fixtureinfo", None)
    if definitions is not None and any(defs[-1].scope == "module" for name, defs in
                                       definitions.name2fixturedefs.items() if name in names and defs):
        return item.module.__name__
    return None


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups off the marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        group = _shared_fixture_group(item)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))
    if hasattr(config, "workerinput"):  # an xdist worker: the long tests first, so none is left last
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_collection_finish(session: pytest.Session) -> None:
    """xdist sends a test to its group by writing the group into the node id; with pytest 9.2 that
    write is lost (pytest-xdist issue 1386): the tests still pass, but every group is split over the
    workers and its fixtures are built on each, so CI runs minutes longer. Said, not silent."""
    if not session.config.getoption("loadgroup", False):
        return
    lost = [item.nodeid for item in session.items if item.get_closest_marker("xdist_group") and "@" not in item.nodeid]
    if lost:
        message = (f"--dist loadgroup did not group {lost[0]} and {len(lost) - 1} more tests: pytest "
                   f"{pytest.__version__} loses xdist's groups, so shared fixtures are built once per worker "
                   "(the test extra pins pytest<9.2)")
        warnings.warn(pytest.PytestWarning(message), stacklevel=1)


@contextlib.contextmanager
def _compile_level(item: pytest.Item):
    """Full XLA optimisation while a `compute_bound` test sets up and runs: the AT&T trainings and
    searches compute for minutes, so optimised loops repay their compile. Measured on two such
    tests and their AT&T fixtures, one process, empty cache: 346 s and 503 CPU-s at level 0, 236 s
    with this marker. The flag is read when a program compiles, so the session fixtures that only
    these tests use are built optimised too (an unmarked test that used them first would build
    them at level 0: slower, not wrong)."""
    if item.get_closest_marker("compute_bound") is None:
        yield
        return
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", before)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    """Setup, call and teardown of one test, in this process, under its compile level."""
    with _compile_level(item):
        return (yield)


def _shared_path(variable: str) -> Path:
    value = os.environ.get(variable)
    if not value:
        pytest.skip(f"{variable} is not set (real data not available on this machine)")
    path = Path(value)
    if not path.exists():
        pytest.fail(f"{variable}={value} is set but does not exist")
    return path


@pytest.fixture(scope="session")
def att_dir() -> Path:
    """The AT&T faces folder (s1..s40, 10 PGM images each)."""
    return _shared_path("JAXDESENS_ATT_DIR")


@pytest.fixture(scope="session")
def lfw_pairs_path() -> Path:
    """The real LFW View 2 pairs.txt."""
    return _shared_path("JAXDESENS_LFW_PAIRS")


@pytest.fixture(scope="session")
def att_clean_workdir(att_dir, tmp_path_factory) -> Path:
    """A clean ResNet-18 (width 0.25, 64 px) trained briefly on AT&T, shared by the search,
    evaluation and export tests. 64 px and lr 0.01, like the CPU defaults: at 48 px or lr 0.1 the
    EBP template drifts off the face (measured: correlation with occlusion 0.44 and 0.31 against 0.77)."""
    from jaxdesens.config import TrainConfig
    from jaxdesens.train import train_and_evaluate

    workdir = tmp_path_factory.mktemp("att_clean")
    config = TrainConfig(model="resnet", data=str(att_dir), steps=240, width=0.25, image_size=64, batch_size=50,
                         lr=0.01, log_every=60, checkpoint_every=240)
    train_and_evaluate(config, workdir, progress=False, log=lambda _: None)
    return workdir


def _train_att(att_dir: Path, workdir: Path, model: str, steps: int = 150) -> Path:
    from jaxdesens.config import TrainConfig
    from jaxdesens.train import train_and_evaluate

    config = TrainConfig(model=model, data=str(att_dir), steps=steps, width=0.25, image_size=64, batch_size=50,
                         lr=0.1, log_every=50, checkpoint_every=steps)
    train_and_evaluate(config, workdir, progress=False, log=lambda _: None)
    return workdir


@pytest.fixture(scope="session")
def att_mask_workdir(att_dir, tmp_path_factory) -> Path:
    """A resnet-mask (random hole-ratio-level masks) with att_clean_workdir's small config, 150 steps."""
    return _train_att(att_dir, tmp_path_factory.mktemp("att_mask"), "mask")


@pytest.fixture(scope="session")
def att_fsm_workdir(att_dir, tmp_path_factory) -> Path:
    """A resnet-fsm (FSM after layer3, random hole-ratio-level masks), same small config, 150 steps."""
    return _train_att(att_dir, tmp_path_factory.mktemp("att_fsm"), "fsm")


@pytest.fixture(scope="session")
def att_searched_mask(att_clean_workdir, tmp_path_factory) -> Path:
    """mask.png searched by Algorithm 1 with att_clean_workdir (64 candidates, no evaluation), with the
    paper's cross-entropy objective: test_evaluate's Table 3/5 margins were measured on that mask. The
    pair-error default hides more; under its mask Situation 2 was 0.638 (resnet-mask) against 0.512
    (resnet), a gap under the test's 0.15 (CI run of 2600a77)."""
    from jaxdesens.jobs.search import SearchJob, run_search_job

    out = tmp_path_factory.mktemp("att_search")
    run_search_job(SearchJob(checkpoint=str(att_clean_workdir), out=str(out), n=64, K=32, T=0.6, batch_images=32,
                             objective="ce", evaluate=False), progress=False, log=lambda _: None)
    return out / "mask.png"
