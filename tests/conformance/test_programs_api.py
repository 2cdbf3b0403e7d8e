"""Every ttnn name, keyword and positional count the programs use exists in real ttnn 0.81.1.

Each program of :mod:`crosscheck.tt.programs` (and the parameter port it needs) runs on the
host model through a recording proxy, without and with a padding mask, and every KV-cache
decode program runs a prefill and steps (``fill_cache``, ``update_cache``; grouped-query
attention also with hand-built parameter trees: scaled RoPE, qk_norm, biases); every
module-level function call is logged as
``(dotted name, positional count, keyword names)`` and checked against the real signature.
Attribute reads (``ttnn.bfloat16``, ``ttnn.MathFidelity.HiFi4``) are checked to exist.
"""

import enum
import inspect
import types
from dataclasses import dataclass, field

import numpy as np
import pytest

from crosscheck.config import AttnConfig
from crosscheck.tt import decode_programs, gqa_programs, runtime
from crosscheck.tt import host_model as hm
from crosscheck.tt.port import ParameterDict
from crosscheck.variants import registry
from tests.conformance.helpers import call_problem, gqa_case, random_case, real_signatures, resolve, seed_config


@dataclass
class Log:
    calls: set = field(default_factory=set)  # (dotted, nargs, keywords)
    reads: set = field(default_factory=set)  # dotted names read


class Recorder:
    """A stand-in for the ``ttnn`` module that logs what the programs use of it."""

    def __init__(self, target, log: Log, prefix: str = ""):
        self._target, self._log, self._prefix = target, log, prefix

    def __getattr__(self, name):
        value = getattr(self._target, name)
        dotted = self._prefix + name
        self._log.reads.add(dotted)
        if isinstance(value, (types.ModuleType, types.SimpleNamespace)) or (
            inspect.isclass(value) and issubclass(value, enum.Enum)
        ):
            return Recorder(value, self._log, dotted + ".")
        if callable(value) and not isinstance(value, enum.Enum):

            def call(*args, **kwargs):
                self._log.calls.add((dotted, len(args), tuple(sorted(kwargs))))
                return value(*args, **kwargs)

            return call
        return value


#: Seed config (generic programs, head_dim 1) and one whose head_dim is 32 (the SDPA programs), with biases.
def _configs(variant):
    cfg = seed_config(variant)
    wide = cfg.replace(d_in=64, d_out=64, num_heads=2, qkv_bias=True, context_length=8)
    return [("seed", cfg), ("head_dim_32", wide)]


CASES = [(v, label, cfg) for v in registry.VARIANTS for label, cfg in _configs(v)]

#: grouped_query_attention, run directly with a hand-built parameter tree (its port table lives elsewhere):
#: Llama 3 (GQA, scaled RoPE, head_dim 2) and Qwen3 (MQA, qk_norm with (1, head_dim) scales, biases).
GQA_CASES = [
    ("llama3_gqa", AttnConfig(d_in=8, d_out=8, num_heads=4, num_kv_groups=2, context_length=8,
                              rope_scaling=AttnConfig.encode_freq_config(
                                  {"factor": 8, "low_freq_factor": 1, "high_freq_factor": 4,
                                   "original_context_length": 16}))),
    ("qwen3_mqa", AttnConfig(d_in=16, d_out=16, num_heads=2, num_kv_groups=1, head_dim=8, qk_norm=True,
                             qkv_bias=True, rope_theta=1_000_000.0, context_length=8)),
]


def _run_gqa(ttnn, device, cfg, padding, prompt_len=2):
    """The forward without and with ``padding``, then the decode with it: ``[outputs], cache heads``."""
    arrays, x = gqa_case(cfg, batch=2)
    parameters = ParameterDict()
    for (module, leaf), array in arrays.items():
        tensor = ttnn.from_torch(array, dtype=ttnn.bfloat16, layout=ttnn.TILE_LAYOUT, device=device)
        parameters.setdefault(module, ParameterDict())[leaf] = tensor

    def send(a):
        return ttnn.from_torch(np.ascontiguousarray(a), dtype=ttnn.bfloat16, layout=ttnn.TILE_LAYOUT, device=device)

    def read(t):
        return np.asarray(ttnn.to_torch(t), dtype=np.float32)

    program = gqa_programs.grouped_query_attention
    outs = [read(program(ttnn, device, send(x), parameters=parameters, config=cfg, attention_mask=mask))
            for mask in (None, padding)]
    decoder = decode_programs.GQA_DECODE
    batch, tokens = x.shape[:2]
    cache = decoder.allocate(ttnn, device, cfg, batch, tokens)
    parts = [read(decoder.prefill(ttnn, device, send(x[:, :prompt_len]), parameters=parameters, config=cfg,
                                  cache=cache, attention_mask=padding[:, :prompt_len]))]
    for pos in range(prompt_len, tokens):
        parts.append(read(decoder.step(ttnn, device, send(x[:, pos : pos + 1]), parameters=parameters, config=cfg,
                                       cache=cache, pos=pos, attention_mask=padding[:, pos : pos + 1])))
    outs.append(np.concatenate(parts, axis=1))
    return outs, tuple(cache.keys.shape)


@pytest.fixture(scope="module")
def usage():
    log, ran = Log(), []
    for variant, label, cfg in CASES:
        state_dict, x = random_case(variant, cfg, batch=2)
        padding = np.ones(x.shape[:-1], np.int64)
        padding[0, -1] = 0  # right padding
        padding[1, :2] = 0  # left padding: causal queries 0 and 1 see no key
        device = hm.open_device(device_id=0)
        try:
            rt = runtime.Runtime("host", hm.DESCRIPTION, Recorder(hm, log), device)
            outs = [runtime.run_variant(rt, variant, cfg, state_dict, x),
                    runtime.run_variant(rt, variant, cfg, state_dict, x, padding)]
            if runtime.has_decode(variant, cfg):
                outs.append(runtime.run_variant_decode(rt, variant, cfg, state_dict, x, 2, padding))
                ran.append(("decode", variant.ttnn_program))
        finally:
            hm.close_device(device)
        assert all(np.all(np.isfinite(out)) for out in outs), f"{variant.name} ({label}) gave non-finite outputs"
        ran.append(runtime.program_name(variant, cfg))
    for label, cfg in GQA_CASES:
        padding = np.ones((2, 6), bool)
        padding[0, -1] = padding[1, 0] = False
        device = hm.open_device(device_id=0)
        try:
            outs, cache_shape = _run_gqa(Recorder(hm, log), device, cfg, padding)
        finally:
            hm.close_device(device)
        assert all(np.all(np.isfinite(out)) for out in outs), f"grouped_query_attention ({label}) gave non-finite outputs"
        assert cache_shape[1] == cfg.kv_heads(), f"grouped_query_attention ({label}): cache {cache_shape}"
        ran += ["grouped_query_attention", ("decode", "grouped_query_attention"), ("gqa_decode", label)]
    return log, ran


def test_every_program_ran(usage):
    _, ran = usage
    expected = set(registry.ttnn_programs())
    assert {r for r in ran if isinstance(r, str)} == expected, f"programs never run here: {sorted(expected - set(ran))}"


def test_every_decode_program_ran_through_the_cache_ops(usage):
    log, ran = usage
    decoded = {name for kind, name in (r for r in ran if isinstance(r, tuple)) if kind == "decode"}
    assert decoded == set(registry.ttnn_decoders()), f"never decoded: {sorted(set(registry.ttnn_decoders()) - decoded)}"
    # grouped_query_attention also decoded with the hand-built trees: scaled RoPE, qk_norm, biases, MQA
    assert {label for kind, label in (r for r in ran if isinstance(r, tuple)) if kind == "gqa_decode"} == {
        label for label, _ in GQA_CASES}
    assert {"fill_cache", "update_cache", "fill_implicit_tile_padding"} <= log.reads
    assert ("update_cache", 3, ()) in log.calls and ("fill_cache", 3, ()) in log.calls  # positions are positional


def test_every_name_read_exists_in_real_ttnn(real_ttnn, usage):
    log, _ = usage
    missing = []
    for dotted in sorted(log.reads):
        try:
            resolve(real_ttnn, dotted)
        except AttributeError:
            missing.append(dotted)
    assert missing == [], f"the programs use names real ttnn 0.81.1 lacks: {missing}"
    assert {"linear", "matmul", "softmax", "from_torch"} <= log.reads  # the proxy really saw the programs
    assert {"rms_norm", "repeat_interleave", "slice", "concat"} <= log.reads  # and grouped_query_attention
    assert ("repeat_interleave", 3, ()) in log.calls  # the kv heads, expanded when attending


def test_every_call_fits_a_real_signature(real_ttnn, usage):
    log, _ = usage
    problems = []
    for dotted, nargs, keywords in sorted(log.calls):
        problem = call_problem(real_signatures(real_ttnn, dotted), nargs, keywords)
        if problem:
            problems.append(f"ttnn.{dotted}({nargs} positional, keywords {list(keywords)}): {problem}")
    assert problems == [], "\n".join(problems)


def test_call_check_can_fail(real_ttnn):
    """A keyword ttnn does not have, a keyword-only passed positionally, a missing argument."""
    assert "no keyword ['fidelity']" in call_problem(real_signatures(real_ttnn, "linear"), 2, ("fidelity",))
    assert "at most 2 positional" in call_problem(real_signatures(real_ttnn, "softmax"), 3, ())
    assert "missing required ['input_tensor_b']" in call_problem(real_signatures(real_ttnn, "matmul"), 1, ())
