"""The test suite's compiler settings: what makes it fast without changing what it checks.

Most of the suite's time is XLA compiling small programs (meta-gradients through a ViT are
large ones). Two settings, applied by ``conftest.py`` before JAX starts, in the pytest process,
its pytest-xdist workers and every subprocess a test starts (they inherit the environment):

- XLA:CPU compiler flags that trade run-time speed for compile time, which is what a suite of
  tiny models spends its time on (measured on ``tests/test_meta_unlearn.py``, 2-core CPU,
  2026-12-05: 95 s of compiling with XLA's defaults, 24 s with both):

  - ``--xla_cpu_use_fusion_emitters=false``: fusions are emitted with the classic LLVM
    emitters instead of the MLIR fusion emitters (the same numbers, bit for bit);
  - ``--xla_backend_optimization_level=0``: LLVM does not optimise the emitted code. Float
    results can differ in the last bit from an optimised build (the order of some sums), as
    they do between CPUs; no test pins float results bit for bit across programs or machines
    (``tests/test_vit.py``'s golden logits are compared to float32 rounding).

  Used only when this jaxlib knows the flags (an unknown XLA flag aborts the process).
- A persistent compilation cache in a fresh temporary folder per run (removed at the end, so
  nothing carries between runs): a program compiled by one worker or subprocess is loaded, not
  compiled again, by the others (the two processes of a multi-process test, the second seed of a
  sweep, a resumed run).

``ONESHUI_TEST_FAST_COMPILE=0`` runs the suite with XLA's defaults and no cache.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile

XLA_TEST_FLAGS = ("--xla_cpu_use_fusion_emitters=false", "--xla_backend_optimization_level=0")
CACHE_VARIABLES = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                   "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
SWITCH = "ONESHUI_TEST_FAST_COMPILE"
# Set by the process that made the cache folder (the pytest controller), which removes it.
CACHE_OWNER = "ONESHUI_TEST_CACHE_OWNER"


def enabled() -> bool:
    return os.environ.get(SWITCH, "1") not in ("0", "false", "False")


@functools.cache
def _flags_known(flags: tuple[str, ...]) -> bool:
    """Whether this jaxlib's XLA accepts ``flags`` (a process with unknown flags aborts)."""
    env = dict(os.environ, XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu")
    probe = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env,
                           capture_output=True, timeout=120)
    return probe.returncode == 0


def with_flags(current: str | None, *extra: str) -> str:
    """``current`` XLA_FLAGS with ``extra`` appended (flags already there are kept once)."""
    flags = (current or "").split()
    return " ".join(flags + [f for f in extra if f not in flags])


def apply() -> None:
    """Sets the compiler flags and the cache in ``os.environ`` (once: workers and subprocesses
    inherit them). Call before JAX initialises its backend."""
    if not enabled() or os.environ.get("PYTEST_XDIST_WORKER"):
        return  # workers inherit the controller's settings
    if _flags_known(XLA_TEST_FLAGS):
        os.environ["XLA_FLAGS"] = with_flags(os.environ.get("XLA_FLAGS"), *XLA_TEST_FLAGS)
    folder = tempfile.mkdtemp(prefix="oneshui_xla_cache_")
    os.environ.update(CACHE_VARIABLES, JAX_COMPILATION_CACHE_DIR=folder,
                      **{CACHE_OWNER: str(os.getpid())})
    if "jax" in sys.modules:  # read from the environment at import: set them directly too
        import jax

        jax.config.update("jax_compilation_cache_dir", folder)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def cleanup() -> None:
    """Removes the run's cache folder (in the process that made it)."""
    folder = os.environ.get("JAX_COMPILATION_CACHE_DIR", "")
    if os.environ.get(CACHE_OWNER) == str(os.getpid()) and os.path.basename(
            folder).startswith("oneshui_xla_cache_"):
        shutil.rmtree(folder, ignore_errors=True)


def subprocess_env(xla_flags: tuple[str, ...] = (), **extra: str) -> dict[str, str]:
    """This process's environment for a subprocess on the CPU: the suite's XLA flags (any host
    device count of this process's left out) plus ``xla_flags`` (e.g. a device count of its
    own), and ``extra`` variables."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", **extra)
    inherited = [f for f in os.environ.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = with_flags(" ".join(inherited), *xla_flags)
    return env
