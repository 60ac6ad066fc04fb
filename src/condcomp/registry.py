"""The technique registry: the bottom of the package. It imports no layer and no model.

A technique is a named part a config can put in a model: ``attention: causal``, ``ffn: moe``,
``block: mod``, ... Each lives in one module (``condcomp/techniques/<name>.py``) holding its settings
dataclass, a keyword-only builder and its registration:

    @register("ffn", "moe", settings=MoESettings, summary="mixture of experts", ...)
    def build(*, model, settings, layer_idx):         # model: ModelConfig; settings: MoESettings
        return MoE(...)

The config reads the registered settings sections (``model.moe.k`` ...), the model asks the
registry for its parts by name, and ``condcomp techniques`` lists what is here. A technique
registered from any module (a test file, a user's package) works the same as a built-in one.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

KINDS = ("attention", "ffn", "block")
# The built-in techniques register when this package is imported (lazily, on first use, so that
# importing the registry stays free of layers and models).
BUILTIN_PACKAGE = "condcomp.techniques"


class RegistryError(ValueError):
    """An unknown or duplicate technique; the message lists what is available."""


@dataclass(frozen=True)
class Technique:
    """One registered technique.

    kind, name:   where a config names it (``model.<kind>: <name>``).
    build:        ``build(*, model, settings, layer_idx) -> nn.Module``; settings is this
                  technique's section of the model config (None without one).
    settings:     dataclass of its settings, or None; the config holds it under ``model.<section>``.
    section:      the settings' key in the model config (default: the name).
    summary:      one line for ``condcomp techniques``.
    causal:       ``(model_config) -> bool``: whether the decoder it builds with these settings is
                  free of look-ahead at inference (the built layers declare the same; tests check both).
    activation:   ``(model_config) -> "gelu" | "swiglu"``: ffn techniques whose default hidden size
                  follows their activation (4 d for gelu, 8/3 d for swiglu).
    aux_loss_weights: default training weight of each aux loss its layers return.
    validate:     ``(model_config) -> None``: checks that need the whole model config; raise
                  ConfigError with the full key path.
    """

    kind: str
    name: str
    build: Callable[..., Any]
    settings: type | None = None
    section: str | None = None
    summary: str = ""
    causal: Callable[[Any], bool] = lambda model: True
    activation: Callable[[Any], str] | None = None
    aux_loss_weights: dict[str, float] = field(default_factory=dict)
    validate: Callable[[Any], None] | None = None


_TECHNIQUES: dict[str, dict[str, Technique]] = {kind: {} for kind in KINDS}
_SECTIONS: dict[str, type] = {}
_loaded = False


def register(kind: str, name: str, *, settings: type | None = None, section: str | None = None, summary: str = "",
             causal: Callable[[Any], bool] | bool = True, activation: Callable[[Any], str] | str | None = None,
             aux_loss_weights: dict[str, float] | None = None, validate: Callable[[Any], None] | None = None):
    """Decorator: make ``build`` available as ``model.<kind>: <name>``. See ``Technique``."""
    if kind not in KINDS:
        raise RegistryError(f"kind must be one of {KINDS}, got {kind!r}")
    if settings is not None:
        section = section or name
    elif section is not None:
        raise RegistryError(f"{kind}: {name}: a settings section needs a settings dataclass")

    def wrap(build: Callable[..., Any]) -> Callable[..., Any]:
        if name in _TECHNIQUES[kind]:
            raise RegistryError(f"{kind} technique {name!r} is already registered")
        if section is not None and _SECTIONS.get(section, settings) is not settings:
            raise RegistryError(f"settings section {section!r} is already used by another settings class")
        _TECHNIQUES[kind][name] = Technique(
            kind=kind, name=name, build=build, settings=settings, section=section, summary=summary,
            causal=causal if callable(causal) else (lambda model, c=causal: c),
            activation=activation if callable(activation) or activation is None else (lambda model, a=activation: a),
            aux_loss_weights=dict(aux_loss_weights or {}), validate=validate)
        if section is not None:
            _SECTIONS[section] = settings
        return build

    return wrap


def unregister(kind: str, name: str) -> None:
    """Remove a technique (tests that register a toy one clean up with this)."""
    load_builtin()
    tech = _TECHNIQUES[kind].pop(name)
    if tech.section is not None and not any(t.section == tech.section for k in KINDS for t in _TECHNIQUES[k].values()):
        _SECTIONS.pop(tech.section, None)


def load_builtin() -> None:
    """Import the built-in techniques once (each registers itself)."""
    global _loaded
    if not _loaded:
        _loaded = True
        importlib.import_module(BUILTIN_PACKAGE)


def get(kind: str, name: str) -> Technique:
    load_builtin()
    if kind not in _TECHNIQUES:
        raise RegistryError(f"kind must be one of {KINDS}, got {kind!r}")
    try:
        return _TECHNIQUES[kind][name]
    except KeyError:
        raise RegistryError(f"unknown {kind} technique {name!r}; available: {sorted(_TECHNIQUES[kind])}") from None


def names(kind: str) -> tuple[str, ...]:
    load_builtin()
    return tuple(_TECHNIQUES[kind])


def techniques() -> list[Technique]:
    """Every registered technique, kind by kind in registration order."""
    load_builtin()
    return [t for kind in KINDS for t in _TECHNIQUES[kind].values()]


def sections() -> dict[str, type]:
    """Settings section name -> settings dataclass, for every registered technique that has one."""
    load_builtin()
    return dict(_SECTIONS)


def default_aux_loss_weights() -> dict[str, float]:
    """The default weight of every aux loss a registered technique declares."""
    out: dict[str, float] = {}
    for tech in techniques():
        out.update(tech.aux_loss_weights)
    return out


def build(kind: str, name: str, *, model: Any, layer_idx: int):
    """Build technique ``<kind>: <name>`` for layer ``layer_idx`` of the model config ``model``."""
    tech = get(kind, name)
    settings = getattr(model, tech.section) if tech.section else None
    return tech.build(model=model, settings=settings, layer_idx=layer_idx)


# -- paper claims ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Claim:
    """A paper's claim about a technique, as a statement ``condcomp compare`` can check on a grid's
    results (``condcomp.compare.claims`` evaluates it; a grid binds it to two of its variants).

    id:        "moe.expert_choice_steps"; a grid names it under ``claims:``.
    statement: with {variant} and {baseline} placeholders, e.g. "{variant} reaches {baseline}'s final
               loss in <= 0.5x the steps".
    paper:     the paper's own figure, cited ("Zhou et al., 2022: >2x faster convergence than top-2").
    test:      "lower_loss": the variant's final validation loss <= the baseline's;
               "steps_to_loss": the variant reaches the baseline's final loss within ``ratio`` x its steps.
    view:      the budget the comparison needs: "steps" (same schedule, equal optimizer steps), "flops"
               or "seconds".
    ratio:     for "steps_to_loss".
    """

    id: str
    statement: str
    paper: str
    test: str
    view: str
    ratio: float | None = None


_CLAIMS: dict[str, Claim] = {}


def register_claim(id: str, *, statement: str, paper: str, test: str, view: str, ratio: float | None = None) -> Claim:
    if test not in ("lower_loss", "steps_to_loss"):
        raise RegistryError(f"claim {id}: test must be lower_loss or steps_to_loss, got {test!r}")
    if view not in ("steps", "flops", "seconds"):
        raise RegistryError(f"claim {id}: view must be steps, flops or seconds, got {view!r}")
    if (test == "steps_to_loss") != (ratio is not None):
        raise RegistryError(f"claim {id}: a ratio goes with test steps_to_loss, and only with it")
    if id in _CLAIMS and _CLAIMS[id] != Claim(id, statement, paper, test, view, ratio):
        raise RegistryError(f"claim {id} is already registered")
    claim = _CLAIMS[id] = Claim(id, statement, paper, test, view, ratio)
    return claim


def claims() -> dict[str, Claim]:
    """Every registered claim by id."""
    load_builtin()
    return dict(_CLAIMS)
