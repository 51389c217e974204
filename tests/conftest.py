"""Shared fixtures. Tests run on CPU, offline; real annotation files come from ../shared/data."""

import contextlib
import fcntl
import json
import os
import time
import types

import pytest
import schedule
import suite_settings
from absl import flags

# Before JAX starts: the compiler flags and compilation cache of the suite (suite_settings.py).
suite_settings.apply()
# grain reads absl flags; tests never parse a command line.
flags.FLAGS.mark_as_parsed()




def pytest_unconfigure(config):
    suite_settings.cleanup()


def pytest_collection_modifyitems(config, items):
    """A test that needs the shared small study (about a minute to build) is ``slow``: the quick
    tier (``-m "not slow"``) never builds it. The files are put in the order the workers should
    take them (``tests/schedule.py``)."""
    for item in items:
        if "small_study" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
    items[:] = schedule.order_items(items)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.environ.get("ONESHUI_SHARED_DATA", os.path.join(REPO, "..", "shared", "data"))
# The folders of SHARED_DATA the real-data tests read (the original layout, README "Real data").
SHARED_FOLDERS = ("mufac", "CelebAMask-HQ", "celeba")
# Set (to 1) where the real data must be there (CI, .ci/run): a missing folder fails the tests
# that need it instead of skipping them.
REQUIRE_SHARED_DATA = "ONESHUI_REQUIRE_SHARED_DATA"


@pytest.fixture(scope="session")
def shared_data() -> str:
    """The real data folder (MUFAC, CelebA / CelebA-HQ annotations) in the original layout.

    Without it the tests that need it skip, naming ONESHUI_SHARED_DATA; with
    ONESHUI_REQUIRE_SHARED_DATA=1 (CI) they fail instead."""
    missing = [f for f in SHARED_FOLDERS if not os.path.isdir(os.path.join(SHARED_DATA, f))]
    if missing:
        reason = (f"real data not found: {os.path.abspath(SHARED_DATA)} has no "
                  f"{', '.join(f + '/' for f in missing)}; set ONESHUI_SHARED_DATA to the folder "
                  "holding mufac/, CelebAMask-HQ/ and celeba/ (README, Real data)")
        if os.environ.get(REQUIRE_SHARED_DATA, "") not in ("", "0"):
            pytest.fail(f"{reason} ({REQUIRE_SHARED_DATA} is set)")
        pytest.skip(reason)
    return SHARED_DATA


@contextlib.contextmanager
def _exclusive(path):
    """One process at a time (the pytest-xdist workers of a session) past this point."""
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _session_dir(tmp_path_factory, name: str) -> str:
    """A folder this session's pytest-xdist workers share (their base temp's parent), or this
    process's own without xdist."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    path = os.path.join(str(root), name)
    os.makedirs(path, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def synthfaces_tfds(tmp_path_factory) -> str:
    """SynthFaces ``small`` built once (TFDS) for every test of the session, workers included
    (the first builds it, the others reuse the finished build)."""
    from oneshui_jax.data import tfds_builders

    path = _session_dir(tmp_path_factory, "tfds")
    with _exclusive(path + ".lock"):
        tfds_builders.build_synthfaces(path, "small")
    return path


@pytest.fixture(scope="session")
def small_study(synthfaces_tfds, tmp_path_factory):
    """The shared small study (``tests/small_study.py``), run once per session: its config, its
    records, ``run_dir(stage)`` and ``first_hashes`` (the hash of each stage's parameters as the
    run that trained them returned them, before any reload). Other pytest-xdist workers reuse
    the finished stages. Tests must not write into its checkpoint or work folders."""
    import small_study as small

    from oneshui_jax import checkpoints, study
    from oneshui_jax.study.context import dataset_folder

    root = _session_dir(tmp_path_factory, "small_study")
    config = small.config(synthfaces_tfds, root)
    hashes_file = os.path.join(root, "first_hashes.json")
    with _exclusive(root + ".lock"):
        if os.path.exists(hashes_file):
            records = study.run(config)  # every stage reused
            with open(hashes_file) as f:
                first_hashes = json.load(f)
        else:
            first_hashes = {}
            real_run_stage = study.stages.run_stage

            def run_stage(ctx, stage, **kwargs):
                record, params = real_run_stage(ctx, stage, **kwargs)
                first_hashes[stage] = checkpoints.params_hash(params)
                return record, params

            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(study.stages, "run_stage", run_stage)
                records = study.run(config)
            with open(hashes_file + ".tmp", "w") as f:
                json.dump(first_hashes, f)
            os.replace(hashes_file + ".tmp", hashes_file)

    def run_dir(stage: str) -> str:
        return checkpoints.run_dir(config.checkpoint_dir, dataset_folder(config),
                                   config.model.name, stage, config.num_identities, config.seed)

    return types.SimpleNamespace(config=config, records=records, run_dir=run_dir,
                                 first_hashes=first_hashes)


# --------------------------------------------------------------------------------------------
# Where the suite's time goes (opt-in): ONESHUI_TEST_COMPILE_LOG=FILE appends one JSON line per
# test with the seconds JAX spent tracing and compiling in this process (subprocesses are not
# seen), the worker that ran it and when it started and ended. ``python tools/test_times.py``
# puts it beside the junit times.

_COMPILE_LOG = os.environ.get("ONESHUI_TEST_COMPILE_LOG")
_jax_seconds = {"trace": 0.0, "compile": 0.0, "cache_load": 0.0}
_JAX_EVENTS = {"/jax/core/compile/jaxpr_trace_duration": "trace",
               "/jax/core/compile/backend_compile_duration": "compile",
               "/jax/compilation_cache/cache_retrieval_time_sec": "cache_load"}


def _count_jax_seconds(event: str, seconds: float, **_) -> None:
    key = _JAX_EVENTS.get(event)
    if key:
        _jax_seconds[key] += seconds


if _COMPILE_LOG:
    import jax.monitoring

    jax.monitoring.register_event_duration_secs_listener(_count_jax_seconds)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(item, nextitem):
        before, start = dict(_jax_seconds), time.time()
        yield
        line = {"test": item.nodeid, **{k: _jax_seconds[k] - before[k] for k in before},
                "worker": os.environ.get("PYTEST_XDIST_WORKER", "main"), "start": start,
                "end": time.time()}
        with open(_COMPILE_LOG, "a") as f:
            f.write(json.dumps(line) + "\n")
