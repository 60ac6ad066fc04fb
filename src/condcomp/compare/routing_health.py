"""Routing health over training, from a run's metrics.jsonl: whether an MoE's routing collapsed.

For every router that logs ``tokens_per_expert`` (the MoE layers), per logged step: each expert's share
of the assignments, the fraction of tokens dropped and the router entropy. The summary reads the last
quarter of training:
- dead experts: experts whose mean share there is under 10% of a uniform share (1/e);
- dropped: mean fraction of tokens that lost an expert to capacity;
- entropy: mean router entropy divided by its maximum, log(e) (1 = a router that has not learned to
  prefer anything; near 0 = every token sent to one expert).
"""

from __future__ import annotations

import math

DEAD_SHARE = 0.1  # of the uniform share 1/e


def routing_health(records: list[dict]) -> dict[str, dict]:
    """router name ("layer1.ffn") -> {"steps": [s], "share": [[share of expert j at step s]],
    "dropped": [f], "entropy": [h], "num_experts": e}, from metrics.jsonl records."""
    out: dict[str, dict] = {}
    for r in records:
        for key, loads in r.items():
            if not key.endswith(".tokens_per_expert") or not isinstance(loads, list) or not loads:
                continue
            name = key[: -len(".tokens_per_expert")]
            total = sum(loads)
            h = out.setdefault(name, {"steps": [], "share": [], "dropped": [], "entropy": [],
                                      "num_experts": len(loads)})
            h["steps"].append(r["step"])
            h["share"].append([x / total if total else 0.0 for x in loads])
            h["dropped"].append(float(r.get(f"{name}.fraction_dropped", 0.0)))
            h["entropy"].append(float(r.get(f"{name}.router_entropy", math.nan)))
    return out


def summarize_health(health: dict) -> dict[str, float]:
    """{"dead_experts", "dropped", "entropy_ratio"} over the last quarter of the logged steps."""
    n = len(health["steps"])
    tail = slice(n - max(1, n // 4), n)
    e = health["num_experts"]
    shares = health["share"][tail]
    mean_share = [sum(s[j] for s in shares) / len(shares) for j in range(e)]
    entropy = [x for x in health["entropy"][tail] if not math.isnan(x)]
    return {
        "dead_experts": sum(1 for s in mean_share if s < DEAD_SHARE / e),
        "dropped": sum(health["dropped"][tail]) / len(shares),
        "entropy_ratio": (sum(entropy) / len(entropy) / math.log(e)) if entropy and e > 1 else math.nan,
    }


def plot_health(name: str, routing: dict[str, dict], path) -> None:
    """Heat maps, one per MoE layer: expert (rows) x logged step (columns), colour = share of the
    assignments; a uniform router is flat at 1/e."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(routing)
    fig, axes = plt.subplots(1, len(layers), figsize=(3.4 * len(layers) + 1.2, 2.9), dpi=110, squeeze=False)
    for ax, layer in zip(axes[0], layers):
        h = routing[layer]
        grid = [[s[j] for s in h["share"]] for j in range(h["num_experts"])]
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(2.0 / h["num_experts"],
                                                                               max(max(row) for row in grid)),
                       extent=(h["steps"][0], h["steps"][-1], h["num_experts"] - 0.5, -0.5))
        s = summarize_health(h)
        ax.set_title(f"{layer}: {s['dead_experts']} dead, {100 * s['dropped']:.0f}% dropped", fontsize=8)
        ax.set_xlabel("step", fontsize=7)
        ax.set_ylabel("expert", fontsize=7)
        ax.tick_params(labelsize=7)
        fig.colorbar(im, ax=ax, fraction=0.046).ax.tick_params(labelsize=6)
    fig.suptitle(f"{name}: each expert's share of the routed tokens over training", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
