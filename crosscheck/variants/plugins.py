"""Attention layers from outside the project: :func:`register_variant` and the plugins that call it.

A plugin is a Python file or module that registers a torch class and its Flax port::

    import crosscheck

    crosscheck.register_variant(
        "ALiBiAttention",
        torch_module=TorchALiBiAttention,  # called with the config as keywords
        flax_module=ALiBiAttention,  # a Linen or NNX class (or both, in a tuple); same keywords
        config={"d_in": 3, "d_out": 4, "num_heads": 2, "context_length": 6},
    )

It reaches the tools through ``crosscheck --plugin FILE.py|module`` (:func:`load_plugin`) or, for an installed
package, an entry point in the group :data:`ENTRY_POINT_GROUP` (:func:`load_entry_points`). The entry it
builds (family :data:`FAMILY`) ports by name (:mod:`crosscheck.variants.byname`) unless given a table;
``--stages`` compares every submodule the two sides share by name. What a plugin cannot say is on the
entry as a reason: no ttnn program unless ``ttnn_program=`` gives one, no ``--train`` (its dropout
takes no injected masks), and nothing inferred from a state dict's shapes (the config flags and the
registered defaults say).

Numpy only at import, like the rest of :mod:`crosscheck.variants`: torch and Flax are imported when a
variant is registered or built.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from crosscheck.config import AttnConfig
from crosscheck.errors import BadInputError
from crosscheck.variants import byname, registry
from crosscheck.variants import portmap as pm
from crosscheck.variants.variant import Variant

#: The family of every registered entry.
FAMILY = "plugin"
#: The entry-point group an installed package adds variants through (each entry point: a module, or a
#: callable that registers when called).
ENTRY_POINT_GROUP = "crosscheck.variants"
#: ``--stages`` of a registered variant: every submodule the two sides share by name (:mod:`crosscheck.checks.stages`).
_STAGES = "crosscheck.checks.stage_reruns:"
#: bf16 roundings assumed for a plugin's ttnn program when the registration does not count them.
DEFAULT_BF16_ROUNDINGS = 8

PortTable = pm.PortMap | Callable[[AttnConfig], pm.PortMap]

#: The entry points loaded in this process (their ``module:attr`` values).
_LOADED: set[str] = set()


def _flax_api(cls) -> str:
    """``"linen"`` or ``"nnx"``, by the class's base (Flax imported now)."""
    from flax import linen, nnx

    if isinstance(cls, type) and issubclass(cls, linen.Module):
        return "linen"
    if isinstance(cls, type) and issubclass(cls, nnx.Module):
        return "nnx"
    raise TypeError(f"flax_module must be a flax.linen.Module or flax.nnx.Module subclass, got {cls!r}")


def _flax_classes(flax_module) -> dict[str, type]:
    """``{api: class}`` of one class or a tuple of them (at most one per API)."""
    classes = tuple(flax_module) if isinstance(flax_module, (tuple, list)) else (flax_module,)
    found: dict[str, type] = {}
    for cls in classes:
        api = _flax_api(cls)
        if api in found:
            raise TypeError(f"two {api} classes given: {found[api].__name__} and {cls.__name__}")
        found[api] = cls
    if not found:
        raise TypeError("flax_module: give a Linen or an NNX class")
    return found


def _check_config(name: str, config: Mapping[str, Any]) -> dict[str, Any]:
    known = AttnConfig.__dataclass_fields__
    unknown = [k for k in config if k not in known]
    if unknown:
        raise ValueError(
            f"register_variant({name!r}): config key(s) {', '.join(map(repr, unknown))} are not AttnConfig "
            f"fields; known: {', '.join(known)}"
        )
    return dict(config)


def _accepted(cls, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` the constructor of ``cls`` takes (``dtype`` or ``rngs`` only where it has them)."""
    params = inspect.signature(cls.__init__).parameters  # the class's own: NNX's metaclass hides it
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(options)
    return {k: v for k, v in options.items() if k in params}


def _keywords(fields: Sequence[str], cfg: AttnConfig) -> dict[str, Any]:
    return {f: getattr(cfg, f) for f in fields}


def _builders(name: str, torch_module, classes: dict[str, type], fields: tuple[str, ...]):
    """``(make_torch, make_flax)`` of a registration."""

    def make_torch(cfg: AttnConfig):
        kwargs = _keywords(fields, cfg)
        try:
            return torch_module(**kwargs)
        except Exception as err:  # noqa: BLE001 - a plugin's constructor: any refusal is bad input
            what = getattr(torch_module, "__name__", torch_module)
            raise BadInputError(f"{name}: {what}(**{kwargs}) failed: {type(err).__name__}: {err}") from None

    def make_flax(cfg: AttnConfig, api: str, **options):
        cls = classes.get(api)
        if cls is None:
            given = ", ".join(f"{a} ({c.__name__})" for a, c in classes.items())
            raise BadInputError(f"{name}: no {api} Flax class registered; it has {given}")
        kwargs = _keywords(fields, cfg)
        if api == "nnx" and "rngs" not in options:
            from flax import nnx

            options = {**options, "rngs": nnx.Rngs(0)}
        return cls(**kwargs, **_accepted(cls, options))

    return make_torch, make_flax


def _no_mask(name: str) -> Callable[..., Any]:
    """The torch forward of a plugin's layer: ``module(x)``; it takes no padding mask."""

    def call(module, x, cfg: AttnConfig, attention_mask=None):
        if attention_mask is not None:
            raise BadInputError(f"{name} is a registered plugin; its forward takes no padding mask (--padding)")
        return module(x)

    return call


def _port_by_name(make_torch: Callable[[AttnConfig], Any]) -> Callable[[AttnConfig], pm.PortMap]:
    """The by-name table at a config, read off the torch module built at it; its buffers are accepted and dropped."""

    @functools.lru_cache(maxsize=32)
    def table(cfg: AttnConfig) -> pm.PortMap:
        from crosscheck.references.byname import parameter_kinds

        module = make_torch(cfg)
        found = byname.port_map(parameter_kinds(module), "linen")
        buffers = tuple(key for key, _ in module.named_buffers())
        masks = tuple(f"{n}.mask" if n else "mask" for n, sub in module.named_modules() if hasattr(sub, "mask"))
        return pm.PortMap(found.entries, ignored=tuple(dict.fromkeys(buffers + masks)))

    return table


def _explicit(name: str, port: PortTable) -> Callable[[AttnConfig], pm.PortMap]:
    if isinstance(port, pm.PortMap):
        return lambda cfg: port
    if callable(port):
        return port
    raise TypeError(f"register_variant({name!r}): port must be None, a PortMap or a callable cfg -> PortMap")


def _config_reader(defaults: Mapping[str, Any], fields: tuple[str, ...]):
    """``module -> AttnConfig``: the registered defaults, then the module's attributes named like the fields."""

    def read(module) -> AttnConfig:
        values = dict(defaults)
        for f in fields:
            value = getattr(module, f, None)
            if isinstance(value, (bool, int, float, str)):
                values[f] = value
        return AttnConfig(**values)

    return read


def register_variant(
    name: str,
    *,
    torch_module: Callable[..., Any],
    flax_module: Any,
    config: Mapping[str, Any],
    port: PortTable | None = None,
    ttnn_program: Callable[..., Any] | None = None,
    bf16_roundings: int | None = None,
    summary: str = "",
) -> Variant:
    """Register an attention layer of your own: every tool then runs it as ``--variant NAME``.

    ``torch_module``: a class or callable, called with ``config``'s values as keywords (the float32
    reference). ``flax_module``: a Linen or NNX class, or a tuple of one of each, called with the same
    keywords (NNX also gets ``rngs=``). ``config``: the defaults, keys among :class:`AttnConfig`'s fields
    (flags such as ``--d-out`` override them). ``port``: ``None`` ports by name (``X.weight`` of an
    ``nn.Linear`` -> ``X/kernel`` transposed ...), or a :class:`~crosscheck.variants.portmap.PortMap` or a
    callable ``cfg -> PortMap``. ``ttnn_program``: a program with the signature of
    :mod:`crosscheck.tt.programs` (``bf16_roundings`` on its path; default :data:`DEFAULT_BF16_ROUNDINGS`);
    without one the ttnn row is left out with the reason. Returns the entry; a name taken by a built-in
    or an already registered variant is a :class:`ValueError`.
    """
    fields = tuple(_check_config(name, config))
    classes = _flax_classes(flax_module)
    make_torch, make_flax = _builders(name, torch_module, classes, fields)
    port_table = _port_by_name(make_torch) if port is None else _explicit(name, port)
    defaults = tuple(config.items())
    read_config = _config_reader({**AttnConfig().to_dict(), **config}, fields)
    torch_class = torch_module if isinstance(torch_module, type) else None
    first = next(iter(classes.values()))
    built = f"{getattr(torch_module, '__name__', torch_module)} and {' / '.join(c.__name__ for c in classes.values())}"
    variant = Variant(
        name=name,
        family=FAMILY,
        summary=summary or f"registered: {built}",
        fields=fields,
        port_table=port_table,
        make_flax=make_flax,
        make_torch=make_torch,
        ttnn_forward=ttnn_program,
        no_ttnn="" if ttnn_program is not None else f"no ttnn program registered for {name}",
        bf16_roundings=DEFAULT_BF16_ROUNDINGS if bf16_roundings is None else int(bf16_roundings),
        matches=(lambda m: isinstance(m, torch_class)) if torch_class is not None else (lambda m: False),
        infer=lambda shapes, known: {},
        torch_config=lambda module, recognise, options: read_config(module),
        flax_config=read_config,
        defaults=defaults,
        output_width=lambda cfg: cfg.d_out if "d_out" in fields else cfg.d_in,
        torch_call=_no_mask(name),
        flax_class="" if first.__name__ == name else first.__name__,
        in_default_run=False,
        no_train="" if "linen" in classes else f"--train runs the Linen class, and {name} has only an NNX one",
        torch_stages=_STAGES + "rerun_by_submodule",
        flax_stages=_STAGES + "flax_by_submodule",
    )
    registry.add(variant)
    caller = sys.modules.get(sys._getframe(1).f_globals.get("__name__", ""))
    if caller is not None:  # forgotten by registrations(), so that importing it again registers again
        caller.__crosscheck_plugin__ = True  # type: ignore[attr-defined]
    return variant


def unregister_variant(name: str) -> Variant:
    """Take a registered variant out of the registry (built-in ones stay); returns its entry."""
    return registry.remove(name)


@contextmanager
def registrations() -> Iterator[None]:
    """Every variant registered inside the block is unregistered when it ends (the plugins' modules are
    forgotten too, so that loading them again registers again)."""
    before = {v.name for v in registry.registered()}
    modules, entry_points = set(sys.modules), set(_LOADED)
    try:
        yield
    finally:
        for v in registry.registered():
            if v.name not in before:
                registry.remove(v.name)
        for module in set(sys.modules) - modules:
            if getattr(sys.modules[module], "__crosscheck_plugin__", False):
                del sys.modules[module]
        _LOADED.intersection_update(entry_points)


# --- loading plugins ---------------------------------------------------------------------------------


def load_plugin(spec: str) -> None:
    """Import the plugin ``spec``: a ``.py`` file (its folder first on ``sys.path`` while it runs, as
    ``python FILE`` would have it) or an importable module name. Any failure is a :class:`BadInputError`
    naming the plugin."""
    if spec.endswith(".py") or os.sep in spec or "/" in spec:
        _load_file(spec)
        return
    try:
        importlib.import_module(spec)
    except Exception as err:  # noqa: BLE001 - whatever the plugin raises, named in one line
        raise BadInputError(f"--plugin {spec}: cannot import module {spec!r}: {type(err).__name__}: {err}") from None


def _load_file(path: str) -> None:
    if not os.path.isfile(path):
        raise BadInputError(f"--plugin {path}: no such file")
    full = os.path.abspath(path)
    stem = os.path.splitext(os.path.basename(full))[0]
    loaded = sys.modules.get(stem)
    if loaded is not None and os.path.abspath(getattr(loaded, "__file__", "") or "") == full:
        return  # already imported (by a plugin that imports it)
    module_name = stem if loaded is None and stem.isidentifier() else f"crosscheck_plugin_{abs(hash(full))}"
    folder = os.path.dirname(full)
    sys.path.insert(0, folder)
    try:
        spec = importlib.util.spec_from_file_location(module_name, full)
        assert spec is not None and spec.loader is not None  # a .py file path always has a loader
        module = importlib.util.module_from_spec(spec)
        module.__crosscheck_plugin__ = True  # type: ignore[attr-defined]
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException as err:
            del sys.modules[module_name]
            if isinstance(err, (KeyboardInterrupt, SystemExit)):
                raise
            raise BadInputError(f"--plugin {path}: importing it raised {type(err).__name__}: {err}") from None
    finally:
        if folder in sys.path:
            sys.path.remove(folder)


def load_entry_points() -> list[str]:
    """Load every entry point of :data:`ENTRY_POINT_GROUP` (a callable one is called); returns their names."""
    from importlib.metadata import entry_points

    loaded = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.value in _LOADED:  # once a process (the CLI may start twice: --plot without --stages)
            continue
        try:
            target = ep.load()
            if callable(target):
                target()
        except Exception as err:  # noqa: BLE001 - an installed plugin's failure, named in one line
            raise BadInputError(
                f"entry point {ep.name!r} ({ep.value}) of group {ENTRY_POINT_GROUP}: {type(err).__name__}: {err}"
            ) from None
        _LOADED.add(ep.value)
        loaded.append(ep.name)
    return loaded
