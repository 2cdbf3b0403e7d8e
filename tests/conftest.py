"""Shared fixtures. Strict dtype promotion catches silent float64/bf16 mixes in the core."""

import importlib.util
import os
import signal

# --- Ctrl-C: the interrupt tests (tests/crosscheck/test_hostile_cli.py) deliver SIGINT to this process and
# to the CLI processes it starts. A shell that starts a job in the background without job control (`make
# test &` in a script, nohup) has it ignored, and an ignored SIGINT stays ignored in every child; Python
# then never raises KeyboardInterrupt. The tests check crosscheck's handling of Ctrl-C, not how the suite
# was started, so the suite takes SIGINT as an interactive Python does (children then start with the default).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# --- sharding: 8 host CPU devices for tests/jaxattn/test_ring.py, test_sharding.py and
# tests/crosscheck/test_shard*.py. XLA reads the flag once, when JAX initialises, so it is set here,
# before `import jax`. Unsharded computations still run on one device, as before.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

# --- compile time: most of this suite's time is XLA compiling small programs (626 of 992 worker-seconds
# on a 2-core CPU), and the tests check numbers, not code speed (the benches run outside pytest):
# * XLA's backend (LLVM) optimisation level 0 halves the compile time of a CPU program. It changes which
#   instructions compute a result, never the HLO's operations, so every comparison's derived float32 bound
#   (jaxattn.tolerance) still holds. Tests of non-finite numbers, where optimised code has shown bugs that
#   level 0 would not (an FMA contraction made NaN out of finite input), carry the `xla_optimized` marker:
#   `make test` runs them in a session of their own at XLA's default level (JAXATTN_TEST_XLA_OPTIMIZED=1),
#   as users compile, and leaves them out of the level-0 session.
# * One persistent compilation cache per session, shared by the pytest-xdist workers and the CLI
#   subprocesses: a program that another test (or the other worker) already compiled, under another jit
#   wrapper, is loaded instead of compiled again. It is created empty for the session and removed after it,
#   so no run reuses an earlier run's programs (CI's clean checkout and a developer's rerun cost the same).
XLA_OPTIMIZED = os.environ.get("JAXATTN_TEST_XLA_OPTIMIZED") == "1"


def _jaxlib_knows(flag: str) -> bool:
    """Whether this jaxlib's XLA has ``flag``: XLA aborts the process on an unknown one in XLA_FLAGS."""
    import glob
    import mmap

    spec = importlib.util.find_spec("jaxlib")
    folders = spec.submodule_search_locations if spec and spec.submodule_search_locations else []
    for folder in folders:
        for path in glob.glob(os.path.join(folder, "*.so")):
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                if data.find(flag.encode() + b"\0") >= 0:
                    return True
    return False


if "JAXATTN_TEST_COMPILE_FLAGS" not in os.environ:  # the controller (or a lone process) decides
    flags = []
    if not XLA_OPTIMIZED and "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
        flags.append("--xla_backend_optimization_level=0")
        # XLA:CPU's older elemental emitters compile the same fusions in about 40 % of the time of its newer
        # fusion emitters (at level 0: 1.6 s against 4.1 s for 24 attention programs, forward and gradient).
        # Both emit the HLO's operations as written, so the derived bounds hold as for level 0; the default
        # (new emitters, default level) is what the `xla_optimized` rerun and every user get. A jaxlib that
        # no longer has the flag keeps its default.
        if _jaxlib_knows("xla_cpu_use_fusion_emitters"):
            flags.append("--xla_cpu_use_fusion_emitters=false")
    # Tests that start a fresh process with a device count of its own pass these on (without the count).
    os.environ["JAXATTN_TEST_COMPILE_FLAGS"] = " ".join(flags)
    os.environ["XLA_FLAGS"] = f"{os.environ['XLA_FLAGS']} {os.environ['JAXATTN_TEST_COMPILE_FLAGS']}".strip()
_OWN_CACHE = "JAXATTN_TEST_COMPILE_CACHE" not in os.environ  # the controller (or a lone process) makes it
if _OWN_CACHE:
    import tempfile

    os.environ["JAXATTN_TEST_COMPILE_CACHE"] = tempfile.mkdtemp(prefix="jaxattn-test-compile-cache-")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ["JAXATTN_TEST_COMPILE_CACHE"])
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# --- threads: when pytest-xdist's workers fill the cores, each worker computes in one thread (XLA's Eigen
# pool, torch's OpenMP pool), and so do the processes it starts: two-thread pools in two busy workers only
# take turns on the cores (measured: tests/jaxattn with two workers, 92 s against 94.5 s).
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")) >= (os.cpu_count() or 1):
    if _jaxlib_knows("xla_cpu_multi_thread_eigen") and "xla_cpu_multi_thread_eigen" not in os.environ["XLA_FLAGS"]:
        os.environ["XLA_FLAGS"] += " --xla_cpu_multi_thread_eigen=false"
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# On a GPU, XLA autotunes every new GEMM and fusion shape as it compiles: seconds per program, and the
# suite compiles thousands of small ones. The tests check numbers, not speed (the bench runs outside
# pytest, with autotuning), so they compile without it. XLA:CPU reads the flag and ignores it.
if "xla_gpu_autotune_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_gpu_autotune_level=0"

# On a GPU, JAX would reserve 75 % of its memory per process: with `make test`'s two pytest-xdist workers
# (and torch CUDA beside them) that runs out. Allocate on demand instead.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import pytest  # noqa: E402

# tests/conformance needs the real ttnn: `make test` runs it in .venv-ttnn (Python 3.12).
collect_ignore = [] if importlib.util.find_spec("ttnn") else ["conformance"]

jax.config.update("jax_numpy_dtype_promotion", "strict")

# --- hypothesis: the "ci" profile (default) is derandomized, so `make test` draws the same examples on every
# machine and a failure reproduces; each test's own @settings(max_examples=...) is sized by what it checks
# (a handful of compiled shapes each: every example of a jitted test is one XLA compilation). The
# "explore" profile (HYPOTHESIS_PROFILE=explore) draws fresh random examples each run, for a hunt.
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("explore", derandomize=False, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# --- GPU: float32 comparisons name their precision; `gpu` tests run only where JAX has a GPU --------
# JAX's default float32 matmul on a GPU is TF32 (10-bit mantissa: 3.4e-4 where the tests assert 1e-5,
# an earlier GPU report); torch keeps TF32 off for matmuls by default but on for cuDNN. Every float32 comparison in
# the suite is a "highest"-precision one, on a CPU (where nothing changes) and on a GPU alike.


@pytest.fixture(autouse=True, scope="session")
def float32_matmuls_at_highest_precision():
    previous = jax.config.jax_default_matmul_precision
    jax.config.update("jax_default_matmul_precision", "highest")
    if importlib.util.find_spec("torch"):
        import torch

        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    yield
    jax.config.update("jax_default_matmul_precision", previous)


def pytest_unconfigure(config):
    if _OWN_CACHE:
        import shutil

        shutil.rmtree(os.environ["JAXATTN_TEST_COMPILE_CACHE"], ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    """Skip ``@pytest.mark.gpu`` tests, with the reason, where JAX's default backend is not a GPU.

    `make test-xla-optimized` collects only the files whose text has ``mark.xla_optimized``: a test that
    gets the marker another way would be left out of that rerun, so it is refused here.
    """
    for path in {item.path for item in items if item.get_closest_marker("xla_optimized")}:
        if "mark.xla_optimized" not in path.read_text():
            raise pytest.UsageError(f"{path}: write the xla_optimized marker as pytest.mark.xla_optimized")
    gpu_tests = [item for item in items if item.get_closest_marker("gpu")]
    if gpu_tests and jax.default_backend() != "gpu":
        skip = pytest.mark.skip(reason=f"needs a CUDA GPU; JAX's default backend here is {jax.default_backend()!r}")
        for item in gpu_tests:
            item.add_marker(skip)


# --- where the suite's time goes: JAXATTN_COMPILE_REPORT=DIR appends to DIR/compiles-<worker>.jsonl ----
# One line per test that compiled: programs compiled and seconds in XLA's compiler (the cost that grows
# on a GPU), from jax.monitoring's compile events; a line as each test ends, so a run stopped at a time
# limit still tells where its time went. tools/gpu_suite.sh sets it; tools/compile_report.py reads it.
_COMPILE_TIMES: list[float] = []


def _on_compile_event(event: str, seconds: float, **_) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        _COMPILE_TIMES.append(seconds)


def _compile_report_path():
    folder = os.environ.get("JAXATTN_COMPILE_REPORT")
    if not folder:
        return None
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, f"compiles-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}.jsonl")


def pytest_configure(config):
    if os.environ.get("JAXATTN_COMPILE_REPORT"):
        jax.monitoring.register_event_duration_secs_listener(_on_compile_event)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    start = len(_COMPILE_TIMES)
    yield
    path = _compile_report_path()
    if path and len(_COMPILE_TIMES) > start:
        import json

        times = _COMPILE_TIMES[start:]
        row = {"test": item.nodeid, "backend": jax.default_backend(), "programs": len(times),
               "compile_s": round(sum(times), 3)}
        with open(path, "a") as out:
            out.write(json.dumps(row) + "\n")


@pytest.fixture
def seed_inputs():
    from crosscheck.seed import INPUTS

    return INPUTS


@pytest.fixture
def without_typecheck():
    """Turn jaxtyping's runtime checks off, to reach the ValueError a user without them gets."""
    from jaxtyping import config

    config.update("jaxtyping_disable", True)
    yield
    config.update("jaxtyping_disable", False)
