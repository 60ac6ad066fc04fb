"""Per-domain evaluation of pruned models (``condcomp prune eval``): bits/byte on each domain's held-out
text, the gap to dense, and whether input-conditioned pruning closed most of the gap static pruning
leaves; and the overlap of the channels conditioned models keep for prompts of different domains.

Every model is scored on the same positions: targets from ``prompt_len - 1`` on in fixed windows of
each domain's validation split (an input-conditioned model's channel masks read positions
0..prompt_len-1, so earlier targets are not causal for it; see ``PromptPrunedFeedForward``).
The prompt of a window is its first ``prompt_len`` tokens, a prefix of the text it continues.

    results = evaluate_runs(find_runs(["runs/pruning"]), domains=DOMAINS, prompt_len=64)
    write_report(results, "docs/results/pruning")
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from condcomp.files import write_json_atomic

DOMAINS = ("stdlib", "python-docs", "kjv", "bbc-news")


@dataclass
class RunResult:
    name: str
    bpb: dict[str, float]  # domain -> bits/byte
    method: str  # dense | magnitude | static | conditioned | magnitude (no fine-tuning)
    sparsity: float = 0.0
    overlap: list | None = None  # conditioned: [layer][domain a][domain b] mean share of kept channels in common

    @property
    def mean(self) -> float:
        return float(np.mean(list(self.bpb.values())))


@dataclass
class PruneResults:
    domains: list[str]
    prompt_len: int
    runs: list[RunResult] = field(default_factory=list)

    def dense(self) -> RunResult | None:
        return next((r for r in self.runs if r.method == "dense"), None)


def find_runs(paths: list[str | Path]) -> dict[str, Path]:
    """name -> run folder: a grid's output folder gives its variants (variants/<name>), any other
    folder is one run named after it."""
    runs: dict[str, Path] = {}
    for path in map(Path, paths):
        if (path / "variants").is_dir():
            for folder in sorted((path / "variants").iterdir()):
                if folder.is_dir() and (folder / "checkpoints").is_dir():
                    runs[folder.name] = folder
        else:
            runs[path.name] = path
    return runs


def _describe(model) -> tuple[str, float]:
    cfg = model.cfg
    if cfg.ffn == "prunable":
        return cfg.prunable.method, cfg.prunable.sparsity
    return "dense", 0.0


def domain_windows(cfg, domain: str):
    """(validation tokens, bytes per token or None) of ``domain`` under a run's tokenizer."""
    import copy

    from condcomp.train.pretrained_init import load_run_corpus

    data_cfg = copy.deepcopy(cfg)
    data_cfg.data.source = domain
    corpus, _ = load_run_corpus(data_cfg)
    return corpus.val, corpus.bytes_of("val")


def evaluate_model(model, cfg, domains, *, prompt_len: int, batches: int, batch_size: int = 16) -> dict[str, float]:
    """bits/byte of ``model`` on each domain's validation windows, scoring targets from
    ``prompt_len - 1`` on."""
    from condcomp.train.trainer import evaluate_split

    out = {}
    for domain in domains:
        tokens, token_bytes = domain_windows(cfg, domain)
        out[domain] = evaluate_split(model, tokens, batch_size=batch_size, max_batches=batches,
                                     precision=cfg.train.precision, token_bytes=token_bytes,
                                     from_position=max(0, prompt_len - 1))["bpb"]
    return out


def domain_overlap(model, cfg, domains, *, prompts_per_domain: int = 32) -> np.ndarray:
    """[n_layers, D, D]: for prompts of domains a and b (distinct prompts when a == b), the mean share
    of the kept channels that both keep. Chance level is the kept share (1 - sparsity)."""
    from condcomp.convert.prune import prompt_masks
    from condcomp.data.batches import eval_starts

    p = cfg.model.prunable.prompt_len
    prompts = []
    for domain in domains:
        tokens, _ = domain_windows(cfg, domain)
        starts = eval_starts(len(tokens), batch_size=prompts_per_domain, seq_len=p, max_batches=1)
        prompts.append(torch.from_numpy(np.stack([np.asarray(tokens[s : s + p]) for s in starts]).astype(np.int64)))
    counts = [len(x) for x in prompts]
    masks = prompt_masks(model, torch.cat(prompts)).float()  # [L, N, d_ff]
    keep = masks[0, 0].sum()
    shared = masks @ masks.transpose(1, 2) / keep  # [L, N, N]
    bounds = np.cumsum([0] + counts)
    out = np.zeros((masks.shape[0], len(domains), len(domains)))
    for a in range(len(domains)):
        for b in range(len(domains)):
            block = shared[:, bounds[a] : bounds[a + 1], bounds[b] : bounds[b + 1]]
            if a == b:
                n = block.shape[1]
                out[:, a, b] = ((block.sum((1, 2)) - block.diagonal(dim1=1, dim2=2).sum(-1)) / max(1, n * (n - 1))).numpy()
            else:
                out[:, a, b] = block.mean((1, 2)).numpy()
    return out


def evaluate_runs(runs: dict[str, Path], *, domains=DOMAINS, prompt_len: int, batches: int = 8,
                  untrained_magnitude: Path | None = None, log=print) -> PruneResults:
    """Evaluate every run on every domain (and the overlap of conditioned runs); with
    ``untrained_magnitude`` (a dense run), also that model pruned by magnitude without any training
    at each sparsity the runs use."""
    from condcomp.convert.prune import magnitude_masks, prune_ffn_channels
    from condcomp.train import load_model

    results = PruneResults(domains=list(domains), prompt_len=prompt_len)
    for name, path in runs.items():
        model, cfg = load_model(path)
        method, sparsity = _describe(model)
        log(f"{name}: {method}{f' at {sparsity:.0%}' if sparsity else ''}")
        run = RunResult(name, evaluate_model(model, cfg, domains, prompt_len=prompt_len, batches=batches), method,
                        sparsity)
        if method == "conditioned":
            run.overlap = domain_overlap(model, cfg, domains).tolist()
        results.runs.append(run)
    if untrained_magnitude is not None:
        dense, cfg = load_model(untrained_magnitude)
        for sparsity in sorted({r.sparsity for r in results.runs if r.sparsity}):
            small = prune_ffn_channels(dense, magnitude_masks(dense, sparsity)).eval()
            name = f"magnitude-{round(sparsity * 100)}-untrained"
            log(f"{name}: the dense seed pruned by magnitude, no training")
            results.runs.append(RunResult(name, evaluate_model(small, cfg, domains, prompt_len=prompt_len,
                                                               batches=batches), "magnitude (no training)", sparsity))
    return results


def _table(results: PruneResults) -> list[str]:
    dense = results.dense()
    head = "| variant | method | sparsity | " + " | ".join(results.domains) + " | mean | gap to dense |"
    lines = [head, "|" + "---|" * 3 + "---:|" * (len(results.domains) + 2)]
    for r in sorted(results.runs, key=lambda r: (r.sparsity, r.method != "dense", r.name)):
        gap = f"{r.mean - dense.mean:+.4f}" if dense is not None and r is not dense else ""
        cells = " | ".join(f"{r.bpb[d]:.4f}" for d in results.domains)
        lines.append(f"| {r.name} | {r.method} | {r.sparsity:.0%} | {cells} | {r.mean:.4f} | {gap} |")
    return lines


def claim_lines(results: PruneResults) -> list[str]:
    """Per sparsity and domain: the gap to dense of conditioned pruning over that of static L0 (the
    issue's goal at 50%: <= 0.5), and over that of the better static method (L0 or fine-tuned
    magnitude), which is the comparison that decides whether conditioning paid."""
    dense = results.dense()
    if dense is None:
        return ["(no dense run to measure gaps against)"]
    lines = ["| sparsity | domain | static L0 gap | magnitude gap | conditioned gap | / L0 gap | / best static gap | "
             "verdict |", "|---:|---|---:|---:|---:|---:|---:|---|"]

    def gap(run, domain):
        return (run.mean - dense.mean) if domain == "mean" else run.bpb[domain] - dense.bpb[domain]

    for sparsity in sorted({r.sparsity for r in results.runs if r.sparsity}):
        pick = {m: next((r for r in results.runs if r.method == m and r.sparsity == sparsity), None)
                for m in ("static", "magnitude", "conditioned")}
        if any(run is None for run in pick.values()):
            continue
        for domain in results.domains + ["mean"]:
            l0, mag, cond = (gap(pick[m], domain) for m in ("static", "magnitude", "conditioned"))
            best = min(l0, mag)
            ratio_l0 = f"{cond / l0:.2f}" if l0 > 0 else "n/a"
            ratio_best = f"{cond / best:.2f}" if best > 0 else "n/a"
            if best <= 0:
                verdict = "n/a (static left no gap)"
            elif cond <= 0.5 * best:
                verdict = "held: conditioned closed over half the best static gap"
            elif cond < best:
                verdict = "partly: conditioned is closer to dense, by less than half"
            else:
                verdict = "did not hold: conditioned is no closer to dense than the best static method"
            lines.append(f"| {sparsity:.0%} | {domain} | {l0:+.4f} | {mag:+.4f} | {cond:+.4f} | {ratio_l0} | "
                         f"{ratio_best} | {verdict} |")
    return lines


def plot_overlap(results: PruneResults, out: Path) -> list[Path]:
    """One PNG per conditioned run: a heat map per layer of the kept-channel overlap between domains."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for r in results.runs:
        if r.overlap is None:
            continue
        overlap = np.asarray(r.overlap)
        n_layers, d = overlap.shape[0], len(results.domains)
        fig, axes = plt.subplots(1, n_layers, figsize=(3.2 * n_layers, 3.4), squeeze=False)
        chance = 1.0 - r.sparsity
        for i, ax in enumerate(axes[0]):
            im = ax.imshow(overlap[i], vmin=chance, vmax=1.0, cmap="viridis")
            ax.set_title(f"layer {i}")
            ax.set_xticks(range(d), results.domains, rotation=60, fontsize=7)
            ax.set_yticks(range(d), results.domains if i == 0 else [""] * d, fontsize=7)
            for a in range(d):
                for b in range(d):
                    ax.text(b, a, f"{overlap[i, a, b]:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if overlap[i, a, b] < (chance + 1) / 2 else "black")
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label=f"shared share of kept channels (chance {chance:.2f})")
        fig.suptitle(f"{r.name}: channels kept for prompts of two domains", fontsize=10)
        path = out / f"overlap_{r.name}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths


def write_report(results: PruneResults, out: str | Path) -> Path:
    """report.md (tables), results.json and the overlap PNGs under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "results.json", {"domains": results.domains, "prompt_len": results.prompt_len,
                                             "runs": [r.__dict__ for r in results.runs]})
    plot_overlap(results, out)
    lines = [f"# Pruning: per-domain validation bits/byte (targets from position {results.prompt_len - 1} on)", "",
             *_table(results), "", "## Input-conditioned gap to dense vs the static methods' gaps", "", *claim_lines(results)]
    for r in results.runs:
        if r.overlap is not None:
            overlap = np.asarray(r.overlap)
            d = len(results.domains)
            within = np.mean([overlap[:, a, a].mean() for a in range(d)])
            across = np.mean([overlap[:, a, b].mean() for a in range(d) for b in range(d) if a != b])
            lines += ["", f"{r.name}: kept channels shared by two prompts of the same domain {within:.3f}, of different "
                          f"domains {across:.3f} (chance {1 - r.sparsity:.3f}); ![overlap](overlap_{r.name}.png)"]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
