"""``condcomp techniques``: every registered technique, its settings and whether it is causal,
generated from the registry so it cannot drift from the code."""

from __future__ import annotations

import json

from condcomp import registry


def _causal_at_defaults(tech: registry.Technique) -> bool:
    """Whether the technique, with default settings, decides without reading later positions at inference."""
    import copy

    from condcomp.config import ModelConfig

    cfg = copy.copy(ModelConfig())  # assigning a field does not re-validate: causality is asked, not enforced
    setattr(cfg, tech.kind, tech.name)
    return bool(tech.causal(cfg))


def describe() -> list[dict]:
    """One mapping per technique: kind, name, summary, causal (at default settings), section, settings
    rows (name, type, default, constraints/help) and default aux-loss weights."""
    out = []
    for tech in registry.techniques():
        rows = tech.settings.describe() if tech.settings is not None else []
        out.append({"kind": tech.kind, "name": tech.name, "summary": tech.summary,
                    "causal": _causal_at_defaults(tech), "section": tech.section,
                    "settings": [{"name": n, "type": t, "default": d, "notes": h} for n, t, d, h in rows],
                    "aux_loss_weights": tech.aux_loss_weights})
    return out


def render_text(items: list[dict]) -> str:
    lines = []
    for item in items:
        lines.append(f"{item['kind']}: {item['name']}  -  {item['summary']}")
        causal = "yes" if item["causal"] else "no (encoders only)"
        aux = ", ".join(f"{k}={v:g}" for k, v in item["aux_loss_weights"].items()) or "none"
        lines.append(f"    causal at inference, default settings: {causal};  aux losses (default weight): {aux}")
        if item["settings"]:
            lines.append(f"    settings (model.{item['section']}.*):")
            width = max(len(s["name"]) for s in item["settings"])
            twidth = max(len(s["type"]) for s in item["settings"])
            for s in item["settings"]:
                default = "null" if s["default"] is None else json.dumps(s["default"])
                lines.append(f"      {s['name']:<{width}}  {s['type']:<{twidth}}  {default:<16} {s['notes']}".rstrip())
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
