"""Reading the real ttnn: signatures of nanobind ops, raw bf16 bits of host tensors, subprocesses.

Nothing here imports ttnn at module level, so the folder collects (and skips) in an
interpreter without it.
"""

from __future__ import annotations

import ast
import contextlib
import enum
import inspect
import os
import re
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
MOCK_CLUSTER = HERE / "mock_wormhole_n150.yaml"
MAIN_PYTHON = ROOT / ".venv" / "bin" / "python"

NO_DEFAULT = "<required>"


# --- signatures ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    name: str
    kind: str  # "positional", "keyword_only", "var_positional", "var_keyword"
    default: str  # source text of the default, or NO_DEFAULT

    def __str__(self) -> str:
        prefix = {"var_positional": "*", "var_keyword": "**"}.get(self.kind, "")
        return prefix + self.name + ("" if self.default == NO_DEFAULT else f"={self.default}")


def _split_top_level(text: str) -> list[str]:
    """Split ``text`` at commas that are not inside brackets or quotes."""
    parts, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    tail = text[start:].strip()
    return parts + ([tail] if tail else [])


def _params_of_text(params_text: str) -> list[Param]:
    """Params of a nanobind signature's parameter list (``self`` dropped)."""
    params, kind = [], "positional"
    for part in _split_top_level(params_text):
        if part == "self":
            continue
        if part == "*":
            kind = "keyword_only"
            continue
        if part == "/":  # positional-only marker: these parameters stay "positional"
            continue
        if part.startswith("**"):
            params.append(Param(part[2:].split(":")[0].strip(), "var_keyword", NO_DEFAULT))
            continue
        if part.startswith("*"):
            params.append(Param(part[1:].split(":")[0].strip(), "var_positional", NO_DEFAULT))
            kind = "keyword_only"
            continue
        # "name: type = default" (the type may hold '=' only inside brackets, which nanobind never emits)
        name = re.match(r"\s*(\w+)", part).group(1)
        default = NO_DEFAULT
        eq = _top_level_equals(part)
        if eq is not None:
            default = part[eq + 1 :].strip()
            obj = re.fullmatch(r"<([\w.]+) object at 0x[0-9a-f]+>", default)
            if obj:  # nanobind prints object defaults by address
                default = obj.group(1).split(".")[-1] + "()"
        params.append(Param(name, kind, default))
    return params


def _top_level_equals(text: str) -> Optional[int]:
    depth = 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "=" and depth == 0:
            return i
    return None


def _signature_lines(doc: str, name: str) -> list[str]:
    """Parameter-list texts of every ``name(...)`` overload line of a nanobind docstring."""
    out = []
    for line in (doc or "").splitlines():
        line = line.strip().strip("`")
        line = re.sub(r"^\d+\.\s*", "", line).strip("`")
        if not line.startswith(name + "("):
            continue
        # match the closing paren of the parameter list
        depth = 0
        for i, ch in enumerate(line):
            if ch == "(":
                depth += 1
            elif ch == ")":
                depth -= 1
                if depth == 0:
                    out.append(line[len(name) + 1 : i])
                    break
    # the numbered "Overloaded function." section repeats the first lines
    return list(dict.fromkeys(out))


def _params_of_inspect(sig: inspect.Signature, drop_self: bool = False) -> list[Param]:
    kinds = {
        inspect.Parameter.POSITIONAL_ONLY: "positional",
        inspect.Parameter.POSITIONAL_OR_KEYWORD: "positional",
        inspect.Parameter.KEYWORD_ONLY: "keyword_only",
        inspect.Parameter.VAR_POSITIONAL: "var_positional",
        inspect.Parameter.VAR_KEYWORD: "var_keyword",
    }
    params = list(sig.parameters.values())
    if drop_self and params and params[0].name == "self":
        params = params[1:]
    return [
        Param(p.name, kinds[p.kind], NO_DEFAULT if p.default is inspect.Parameter.empty else _default_text(p.default))
        for p in params
    ]


def _default_text(value: Any) -> str:
    """``repr`` of a default, with object addresses replaced by a constructor call (as nanobind prints)."""
    if isinstance(value, enum.Enum):  # nanobind prints enum defaults as Class.MEMBER
        return f"{type(value).__name__}.{value.name}"
    text = repr(value)
    return f"{type(value).__name__}()" if " object at 0x" in text else text


def resolve(root: Any, dotted: str) -> Any:
    obj = root
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class Overload:
    params: tuple[Param, ...]
    #: False for a hand-written nanobind signature (``nb::sig``) that prints no defaults at all.
    defaults_known: bool = True


def _nb_overloads(target: Any) -> list[Overload]:
    """Overloads from nanobind's ``__nb_signature__``: ``(text, doc, default values)`` per overload.

    The text writes defaults as ``\\0``, ``\\1`` ... indexing the default values, so they are
    compared as values (rendered like :func:`_default_text`), not as printed text.
    """
    out = []
    for text, _doc, defaults in target.__nb_signature__:
        text = text.replace("\\*", "*")
        head = text.index("(")
        depth = 0
        for i in range(head, len(text)):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            if depth == 0:
                break
        params = []
        for p in _params_of_text(text[head + 1 : i]):
            ref = re.fullmatch(r"\\(\d+)", p.default)
            if ref and defaults is not None:
                p = Param(p.name, p.kind, _default_text(defaults[int(ref.group(1))]))
            params.append(p)
        custom = defaults is None and all(p.default == NO_DEFAULT for p in params)
        out.append(Overload(tuple(params), defaults_known=not custom))
    return list({o: None for o in out})


def real_signatures(ttnn: Any, dotted: str) -> list[Overload]:
    """Every overload of ``ttnn.<dotted>``; raises ``AttributeError`` if the name does not exist.

    ttnn ops are ``ttnn.decorators.FastOperation`` objects wrapping either a Python function
    (``inspect.signature`` works) or a nanobind callable object, whose class's ``__call__`` carries
    ``__nb_signature__``. Plain nanobind functions (``ttnn.open_device``, Tensor methods) carry it
    themselves. ``inspect.signature`` on a FastOperation only gives ``(*function_args, **function_kwargs)``.
    """
    obj = resolve(ttnn, dotted)
    target = getattr(obj, "function", obj)
    if inspect.isfunction(target) or inspect.ismethod(target):
        return [Overload(tuple(_params_of_inspect(inspect.signature(target), drop_self=dotted.startswith("Tensor."))))]
    candidates = (target.__init__,) if inspect.isclass(target) else (target, type(target).__call__)
    for candidate in candidates:
        if hasattr(candidate, "__nb_signature__"):
            return _nb_overloads(candidate)
    raise AssertionError(f"ttnn.{dotted}: no readable signature ({type(target).__name__})")


def host_signature(fn: Any, dotted: str = "") -> list[Param]:
    return _params_of_inspect(inspect.signature(fn), drop_self=dotted.startswith("Tensor."))


def defaults_equal(real: str, host: str) -> bool:
    """Whether a real default (source text) and a host default (``repr``) denote the same value."""
    if real == host:
        return True
    try:
        r, h = ast.literal_eval(real), ast.literal_eval(host)
    except (ValueError, SyntaxError):
        # enum members and config objects: compare their last dotted name (TileReshapeMapMode.CACHE)
        return real.split(".")[-1] == host.split(".")[-1] and real != NO_DEFAULT and host != NO_DEFAULT
    if isinstance(r, bool) or isinstance(h, bool):
        return type(r) is type(h) and r == h
    return r == h


def signature_problems(real: list[Overload], host: list[Param]) -> list[str]:
    """Empty when ``host`` equals one real overload (names, order, kinds, defaults); else what differs.

    Defaults are not compared for a hand-written nanobind signature that prints none.
    """
    best: Optional[list[str]] = None
    for ov in real:
        overload, problems = ov.params, []
        if [p.name for p in overload] != [p.name for p in host]:
            problems.append(f"names {[p.name for p in host]} != real {[p.name for p in overload]}")
        else:
            for r, h in zip(overload, host, strict=True):
                if r.kind != h.kind:
                    problems.append(f"{h.name}: kind {h.kind} != real {r.kind}")
                if not ov.defaults_known:
                    continue
                if (r.default == NO_DEFAULT) != (h.default == NO_DEFAULT) or not (
                    r.default == h.default == NO_DEFAULT or defaults_equal(r.default, h.default)
                ):
                    problems.append(f"{h.name}: default {h.default} != real {r.default}")
        if not problems:
            return []
        if best is None or len(problems) < len(best):
            best = problems
    return best or ["no readable real signature"]


# --- bf16 bits of a real host tensor -----------------------------------------------------------------


def host_tensor_bits(ttnn: Any, tensor: Any, tmp_dir: Path) -> np.ndarray:
    """The raw 16-bit words of a ROW_MAJOR bf16 host tensor, in logical order.

    ``to_list`` gives Python floats (no NaN sign or payload) and ``to_numpy`` refuses bf16 via
    DLPack, so the tensor is written with ``ttnn.dump_tensor``: its file ends with the raw data.
    The caller cross-checks the non-NaN words against ``to_list``.
    """
    count = int(np.prod(tuple(tensor.shape)))
    path = tmp_dir / f"t{os.getpid()}_{id(tensor)}.tensorbin"
    ttnn.dump_tensor(str(path), tensor)
    raw = path.read_bytes()
    path.unlink()
    return np.frombuffer(raw[len(raw) - 2 * count :], dtype=np.uint16).reshape(tuple(tensor.shape)).copy()


@contextlib.contextmanager
def numpy_as_torch():
    """Let the real ``ttnn.from_torch`` take numpy arrays in an interpreter without torch.

    ``from_torch`` only does ``torch.from_numpy(array)`` and two ``isinstance`` checks before the
    nanobind constructor, which accepts numpy arrays itself; this stand-in makes those steps
    identities. It is removed again on exit (hypothesis and others look for ``torch`` in sys.modules).
    """
    if "torch" in sys.modules:
        raise RuntimeError("a real torch is imported; use it instead of the stand-in")
    shim = types.ModuleType("torch")
    shim.Tensor = np.ndarray
    shim.from_numpy = lambda array: array
    shim.float32 = np.dtype(np.float32)
    sys.modules["torch"] = shim
    try:
        yield
    finally:
        del sys.modules["torch"]


# --- subprocesses ----------------------------------------------------------------------------------


def run_python(code_or_args, *, env_extra=None, python=sys.executable, timeout=300) -> subprocess.CompletedProcess:
    """``python -c code`` (or ``python *args``) with this checkout first on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.update(env_extra or {})
    args = ["-c", code_or_args] if isinstance(code_or_args, str) else [str(a) for a in code_or_args]
    return subprocess.run([str(python), *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)


def call_problem(real: list[Overload], nargs: int, keywords: tuple[str, ...]) -> Optional[str]:
    """None when some real overload accepts ``nargs`` positional arguments and these ``keywords``."""
    reasons = []
    for ov in real:
        positional = [p.name for p in ov.params if p.kind == "positional"]
        var_pos = any(p.kind == "var_positional" for p in ov.params)
        var_kw = any(p.kind == "var_keyword" for p in ov.params)
        names = {p.name for p in ov.params if p.kind in ("positional", "keyword_only")}
        given = set(positional[:nargs]) | set(keywords)
        required = {p.name for p in ov.params if p.kind in ("positional", "keyword_only") and p.default == NO_DEFAULT}
        if nargs > len(positional) and not var_pos:
            reasons.append(f"takes at most {len(positional)} positional arguments, got {nargs}")
        elif not var_kw and set(keywords) - names:
            reasons.append(f"no keyword {sorted(set(keywords) - names)}")
        elif set(positional[:nargs]) & set(keywords):
            reasons.append(f"{sorted(set(positional[:nargs]) & set(keywords))} given twice")
        elif ov.defaults_known and required - given:
            reasons.append(f"missing required {sorted(required - given)}")
        else:
            return None
    return "; ".join(dict.fromkeys(reasons)) or "no readable real signature"


# --- cases -----------------------------------------------------------------------------------------


def seed_config(variant):
    """The default run's config: ``AttnConfig()`` with the variant's own defaults."""
    from crosscheck.config import AttnConfig

    return AttnConfig(**dict(variant.defaults))


def random_case(variant, cfg, *, seed: int = 0, batch: int = 2, tokens: Optional[int] = None):
    """``(state_dict, inputs)``: uniform(-1, 1) weights in torch layout with the causal buffers, N(0, 1) inputs."""
    rng = np.random.default_rng(seed)
    portmap = variant.portmap(cfg)
    state_dict = {e.torch_key: rng.uniform(-1, 1, e.torch_shape).astype(np.float32) for e in portmap.entries}
    state_dict.update({b.torch_key: b.expected().astype(np.float32) for b in portmap.buffers})
    resolved = variant.resolve(cfg)
    tokens = tokens or min(resolved.context_length, 6) or 6
    shape = (tokens, resolved.d_in) if variant.unbatched and batch == 0 else (batch, tokens, resolved.d_in)
    return state_dict, rng.standard_normal(shape).astype(np.float32)


def gqa_case(cfg, *, seed: int = 0, batch: int = 2, tokens: int = 6):
    """``(arrays, x)`` for ``grouped_query_attention`` (no port table yet): ttnn-layout float32 arrays by tree path.

    ``arrays[("W_query", "weight")]`` is ``(d_in, H * hd)``, biases and norm scales ``(1, n)``;
    weights uniform(-1, 1) / sqrt(fan-in), N(0, 1) inputs.
    """
    rng = np.random.default_rng(seed)
    hd, heads, kv = cfg.resolved_head_dim(), cfg.num_heads, cfg.kv_heads()
    widths = {"W_query": (cfg.d_in, heads * hd), "W_key": (cfg.d_in, kv * hd), "W_value": (cfg.d_in, kv * hd),
              "out_proj": (heads * hd, cfg.d_in)}
    arrays = {}
    for name, (n_in, n_out) in widths.items():
        arrays[(name, "weight")] = rng.uniform(-1, 1, (n_in, n_out)) / np.sqrt(n_in)
        if cfg.qkv_bias:
            arrays[(name, "bias")] = rng.uniform(-1, 1, (1, n_out)) / np.sqrt(n_in)
    if cfg.qk_norm:
        arrays[("q_norm", "scale")] = rng.uniform(0.5, 1.5, (1, hd))
        arrays[("k_norm", "scale")] = rng.uniform(0.5, 1.5, (1, hd))
    x = rng.standard_normal((batch, tokens, cfg.d_in))
    return {k: v.astype(np.float32) for k, v in arrays.items()}, x.astype(np.float32)
