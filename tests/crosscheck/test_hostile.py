"""A property-based suite over hostile CLI arguments, files, bundles and module configs.

Whatever hypothesis draws, a run must: exit 0, 1 or 2 (argparse's own exit counts as 2); print
no traceback; leave every input file byte-for-byte as it was; never report a non-finite number
as a pass. A few repros also run in a subprocess under ``resource.setrlimit(RLIMIT_AS)``, so an
allocation the budget failed to foresee would be a MemoryError traceback, not a slow machine.
In-process calls keep it cheap; examples are few and shapes tiny.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crosscheck.config import AttnConfig
from crosscheck.errors import BadInputError
from crosscheck.porting import bundle as bd

from .cli_in_process import main_in_process

torch = pytest.importorskip("torch")

SETTINGS = settings(max_examples=5, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

#: Values a careless user or an attacker gives a size flag.
HOSTILE_INT = st.sampled_from(["0", "-1", "1", "2", "3", "7", "40000", "300000000", "1000000000", "1e3", "nan", "", "x"])
SIZE_FLAGS = ("--d-in", "--d-out", "--num-heads", "--context-length", "--tokens", "--batch", "--seed")
VARIANTS = ("CausalAttention", "MultiHeadAttention", "MultiHeadAttentionWrapper", "SelfAttentionV2")


def _call(argv) -> tuple[int, str]:
    """``crosscheck.cli.main(argv)`` -> ``(exit code, stderr)``; argparse's SystemExit is its exit code."""
    proc = main_in_process(argv)
    return proc.returncode, proc.stderr


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _assert_no_nan_pass(report_path) -> None:
    """Every row the JSON report marks as passed has finite metrics."""
    report = json.loads(open(report_path).read())
    for row in report["results"]:
        if row.get("passed"):
            for key in ("max_abs_err", "pcc", "max_rel_err"):
                value = row.get(key)
                assert value is None or math.isfinite(value), row


def _check(code: int, err: str) -> None:
    assert code in (0, 1, 2), (code, err)
    assert "Traceback" not in err, err
    if code == 2:
        assert len(err.strip().splitlines()) == 1, err


@SETTINGS
@given(variant=st.sampled_from(VARIANTS), flags=st.lists(st.tuples(st.sampled_from(SIZE_FLAGS), HOSTILE_INT),
                                                          max_size=3, unique_by=lambda t: t[0]))
def test_hostile_flags(tmp_path, variant, flags):
    report = tmp_path / "r.json"
    argv = ["--variant", variant, "--backends", "torch,flax", "--max-memory", "1G", "-q", "--json", str(report)]
    for flag, value in flags:
        argv += [flag, value]
    code, err = _call(argv)
    _check(code, err)
    if code in (0, 1):
        _assert_no_nan_pass(report)


# --- files ----------------------------------------------------------------------------------------------

DTYPES = st.sampled_from(["float64", "float32", "float16", "bfloat16", "int32", "int8", "bool"])
SHAPES = st.lists(st.integers(0, 7), min_size=0, max_size=4).map(tuple)


def _tensor(dtype: str, shape, scale: float):
    t = torch.from_numpy(np.asarray(np.random.default_rng(0).random(shape) * scale))
    return t.to(getattr(torch, dtype))


@st.composite
def weight_files(draw, tmp):
    """A weights file of any format, dtype, shape, with garbage bytes or an expanded view."""
    from safetensors.torch import save_file

    kind = draw(st.sampled_from(["safetensors", "pt", "pt-expanded", "garbage", "truncated"]))
    dtype, shape = draw(DTYPES), draw(SHAPES)
    scale = draw(st.sampled_from([1.0, 1e20, float("nan")]))
    keys = draw(st.sampled_from([("W_query.weight", "W_key.weight", "W_value.weight"), ("W_query.weight",),
                                 ("W_query.weight", "W_key.weight", "W_val.weight", "W_value.weight")]))
    sd = {k: _tensor(dtype, shape, scale).contiguous() for k in keys}
    if kind == "safetensors":
        path = tmp / "w.safetensors"
        save_file(sd, str(path))
    elif kind == "pt":
        path = tmp / "w.pt"
        torch.save(sd, path)
    elif kind == "pt-expanded":
        path = tmp / "w.pt"
        torch.save({k: torch.zeros(1).expand(draw(st.sampled_from([2, 60000])), 3) for k in keys}, path)
    elif kind == "garbage":
        path = tmp / draw(st.sampled_from(["w.pt", "w.safetensors"]))
        path.write_bytes(draw(st.binary(max_size=64)))
    else:
        path = tmp / "w.safetensors"
        save_file(sd, str(path))
        path.write_bytes(path.read_bytes()[: draw(st.integers(0, max(path.stat().st_size - 1, 0)))])
    return path


@SETTINGS
@given(data=st.data())
def test_hostile_weight_files(tmp_path, data):
    path = data.draw(weight_files(tmp_path))
    before = _sha(path)
    report = tmp_path / "r.json"
    code, err = _call(["--weights", str(path), "--backends", "torch,flax", "--max-memory", "1G", "-q",
                       "--json", str(report)])
    _check(code, err)
    assert _sha(path) == before
    if code in (0, 1):
        _assert_no_nan_pass(report)


@SETTINGS
@given(dtype=DTYPES, shape=SHAPES, scale=st.sampled_from([1.0, 1e5, 1e30, float("inf")]),
       fmt=st.sampled_from(["npy", "pt", "safetensors"]))
def test_hostile_input_files(tmp_path, dtype, shape, scale, fmt):
    t = _tensor(dtype, shape, scale)
    path = tmp_path / f"x.{fmt}"
    if fmt == "npy":
        np.save(path, t.float().numpy() if dtype == "bfloat16" else t.numpy())
    elif fmt == "pt":
        torch.save(t, path)
    else:
        from safetensors.torch import save_file

        save_file({"x": t.contiguous()}, str(path))
    before = _sha(path)
    report = tmp_path / "r.json"
    code, err = _call(["--input", str(path), "--variant", "CausalAttention", "--backends", "torch,flax",
                       "--max-memory", "1G", "-q", "--json", str(report)])
    _check(code, err)
    assert _sha(path) == before
    if code in (0, 1):
        _assert_no_nan_pass(report)


# --- bundles and module configs ---------------------------------------------------------------------------

CONFIG_VALUES = {
    "d_in": st.sampled_from([-1, 0, 3, 5, 10**9]),
    "d_out": st.sampled_from([0, 2, 10**9]),
    "context_length": st.sampled_from([0, 6, 40000, 10**9]),
    "num_heads": st.sampled_from([0, 1, 2, 10**9]),
    "dropout": st.sampled_from([0.0, 0.5, 1.0, -0.5, float("nan")]),
}


@SETTINGS
@given(changes=st.fixed_dictionaries({}, optional=CONFIG_VALUES),
       x_dtype=st.sampled_from([np.float32, np.float64, np.int32]),
       x_fill=st.sampled_from([0.5, np.nan]))
def test_hostile_bundles(tmp_path, changes, x_dtype, x_fill):
    rng = np.random.default_rng(0)
    cfg = AttnConfig(d_in=3, d_out=2, context_length=6, num_heads=1).replace(**changes)
    sd = {f"W_{n}.weight": rng.standard_normal((2, 3)).astype(np.float32) for n in ("query", "key", "value")}
    x = np.full((1, 6, 3), x_fill).astype(x_dtype) if x_dtype is not np.int32 else np.ones((1, 6, 3), np.int32)
    path = tmp_path / "b.safetensors"
    bd.write_bundle(path, [bd.BundleCase("CausalAttention", cfg, sd, x)])
    before = _sha(path)
    out = tmp_path / "o.safetensors"
    bd.write_outputs(out, {"CausalAttention": np.zeros((1, 6, 2), np.float32)}, {"backend": "flax"})
    report = tmp_path / "r.json"
    code, err = _call(["bundle", "compare", str(path), str(out), "--max-memory", "1G", "--json", str(report)])
    _check(code, err)
    assert _sha(path) == before
    valid = (cfg.d_in == 3 and cfg.d_out >= 1 and 6 <= cfg.context_length <= 40000 and 1 <= cfg.num_heads <= 2
             and 0 <= cfg.dropout < 1 and x_dtype is not np.int32 and not np.isnan(x_fill))
    if not valid:
        assert code == 2, err
    if code in (0, 1):
        _assert_no_nan_pass(report)


@SETTINGS
@given(changes=st.fixed_dictionaries({}, optional=CONFIG_VALUES))
def test_hostile_module_configs(changes):
    """jaxattn refuses what the CLI refuses with a ValueError, and never allocates for an absurd size."""
    import jax
    import jax.numpy as jnp

    import jaxattn

    cfg = {"d_in": 3, "d_out": 2, "context_length": 6, "num_heads": 1, "dropout": 0.0, **changes}
    module = jaxattn.MultiHeadAttention(**cfg)
    x = jnp.ones((1, 2, max(min(cfg["d_in"], 8), 1)), jnp.float32)
    try:
        # eval_shape: the check runs at trace time, and nothing of size d_out^2 is allocated.
        jax.eval_shape(module.init, jax.random.PRNGKey(0), x)
    except ValueError as err:
        assert str(err)
    else:
        assert cfg["d_in"] == x.shape[-1] and cfg["d_out"] >= 1 and cfg["num_heads"] >= 1
        assert cfg["d_out"] % cfg["num_heads"] == 0 and 0 <= cfg["dropout"] < 1


def test_bundle_reader_raises_only_bad_input(tmp_path):
    """A bundle with hostile JSON in its metadata: always BadInputError, whatever the field."""
    from safetensors.numpy import save_file

    x = np.ones((1, 6, 3), np.float32)
    for config in ({"d_in": "3"}, {"dropout": None}, {"num_heads": 1e400}, {"rope_scaling": "{"}, [], "x",
                   {"d_in": 3, "bogus": 1}):
        header = {"format": bd.BUNDLE_FORMAT, "version": bd.FORMAT_VERSION,
                  "cases": [{"variant": "CausalAttention", "config": config}], "meta": {}}
        path = tmp_path / "b.safetensors"
        save_file({"CausalAttention/inputs": x}, str(path), metadata={"crosscheck": json.dumps(header)})
        with pytest.raises(BadInputError):
            bd.read_bundle(path)


# --- peak memory under a limit the test sets --------------------------------------------------------------

#: The children may map this much beyond what ``import torch`` maps (a CPU build ~0.6 GiB, a CUDA build
#: GiBs of libraries). Their default budget is then that limit (crosscheck.pipeline.budget.default_budget), on a
#: machine with 128 GiB of memory as on one with 16; every repro below is estimated at 13 GiB or more.
HEADROOM = 4 << 30


@pytest.fixture(scope="module")
def limit_as() -> int:
    """The children's address-space limit (``RLIMIT_AS``): what a process has mapped after ``import torch``, plus HEADROOM."""
    code = "import re, torch; print(re.search(r'VmPeak:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout) * 1024 + HEADROOM


#: The child sets its own limit before importing anything (no preexec_fn: forking a process with JAX's
#: threads running can deadlock).
_CHILD = ("import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_AS, ({0}, {0})); "
          "sys.argv = ['crosscheck'] + sys.argv[1:]; runpy.run_module('crosscheck', run_name='__main__')")


@pytest.fixture(scope="module")
def expanded(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    torch.save({"W_query.weight": torch.zeros(1).expand(60000, 60000)}, d / "w.pt")
    return d / "w.pt"


@pytest.mark.parametrize("argv", [
    ["--variant", "CausalAttention", "--context-length", "40000"],
    ["--batch", "1000000000"],
    ["--tokens", "16384", "--d-in", "4"],
    ["bench", "--tokens", "65536", "--impls", "torch-book"],
    "EXPANDED",
], ids=["context", "batch", "tokens", "bench-tokens", "expanded-pt"])
def test_repros_under_an_address_space_limit(argv, expanded, limit_as):
    """The default budget (no --max-memory): refused, exit 2, one line, inside 4 GiB of address space beyond torch's."""
    if argv == "EXPANDED":
        argv = ["--weights", str(expanded)]
    before = _sha(expanded)
    proc = subprocess.run([sys.executable, "-c", _CHILD.format(limit_as), *argv], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "MemoryError" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "over the memory budget" in proc.stderr
    assert _sha(expanded) == before


def test_the_address_space_limit_bites(limit_as):
    """Without it the tests above would prove nothing: the limit's worth of bytes in the limited child is a MemoryError."""
    code = f"import resource; resource.setrlimit(resource.RLIMIT_AS, ({limit_as}, {limit_as})); bytearray({limit_as})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "MemoryError" in proc.stderr
