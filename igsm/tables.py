"""Result tables (paper Tables 1, 3–5, 10) assembled from the workflow's JSON files alone.

One row per (dataset, model, channel ratio, objective): parameters, MACs, FID, training steps,
and, where the paper reports the same experiment (same dense model, derived pruning-ratio label,
criterion and objective settings), the published FID (igsm/paper/tables.yaml, the one home of the
paper's numbers) and our difference to it. A text-conditioned experiment with CLIP scores (issue 31,
item 5) also gets a CLIP column, headed with the CLIP model that made it; no other table does.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from igsm.paper.tables import published_fids
from igsm.schema import schema_defaults

COLUMNS = ["experiment", "dataset", "model", "criterion", "channel_ratio", "pr_label", "objective",
           "params_M", "macs_G", "images_per_s", "speed", "fid", "fid_images", "fid_mode", "training_steps",
           "batch_size", "sec_per_step", "train_minutes", "peak_memory_GiB", "paper_fid", "delta_fid",
           "paper_source", "base_model", "reuse", "target_mac_fraction", "sampler", "sampler_steps", "mac_fraction",
           "sampling_images_per_s", "sampling_speedup"]
# Only in the tables of experiments with CLIP scores (clip_score.enabled), after the FID's columns.
CLIP_COLUMNS = ["clip_score", "clip_model"]
# Only in the tables of experiments compared with their dense samples (consistency.enabled), after those.
CONSISTENCY_COLUMNS = ["ssim_to_dense", "psnr_to_dense"]
# Only in the tables of experiments with PRDC (prdc.enabled), after those.
PRDC_COLUMNS = ["precision", "recall", "density", "coverage"]


def _load(path):
    return json.loads(Path(path).read_text()) if path else {}


def same_objective(ours: dict, theirs: dict) -> bool:
    """Whether two objectives' settings are the same experiment: the same terms with the same
    weights, and the same directions (with the same OTD settings)."""
    def terms(settings):
        return {term: float(w) for term, w in settings["weights"].items() if float(w) > 0}

    def directions(settings):  # the OTD settings count only where OTD evolves the directions
        settings = {**schema_defaults("objective"), **settings}
        return settings["directions"], settings["otd"] if settings["directions"] == "otd" else None

    return terms(ours) == terms(theirs) and directions(ours) == directions(theirs)


def paper_value(dense_model: str, pr_label: str, criterion: str, objective: dict | None):
    """(published FID, where) of the same experiment in the paper (igsm/paper/tables.yaml: the same
    dense model, pruning-ratio label, criterion and objective settings), or (None, '')."""
    for entry in published_fids():
        if entry["dense"] != dense_model:
            continue
        if pr_label == "dense":
            if entry["pr"] is None:
                return entry["fid"], entry["where"]
        elif (entry["pr"] is not None and pr_label and abs(float(pr_label) - entry["pr"]) < 1e-9
              and entry["criterion"] == criterion and objective and same_objective(objective, entry["objective"])):
            return entry["fid"], entry["where"]
    return None, ""


def build_rows(experiment: str, dataset: str, dense_model: str, rows: list[dict],
               objectives: dict | None = None) -> pd.DataFrame:
    """One table row per scored model; ``rows`` hold the paths of its JSON files (rules/common.smk
    ``table_rows``): ``metadata`` (what the model is: results/variants/<exp>/<variant>.json),
    ``fid``, ``efficiency``, and ``summary`` / ``prune_report`` / ``clip_score`` / ``consistency`` /
    ``prdc`` where it has them;
    ``objectives``: the config's objectives (their directions; the metadata holds the weights). A
    block-reuse or sampler variant gets no paper value: the paper's FIDs are of the paper's sampler."""
    out = []
    for entry in rows:
        meta, fid, eff = _load(entry["metadata"]), _load(entry["fid"]), _load(entry["efficiency"])
        clip, consistency = _load(entry.get("clip_score")), _load(entry.get("consistency"))
        prdc = _load(entry.get("prdc"))
        summary, report = _load(entry["summary"]), _load(entry["prune_report"])
        timing = summary.get("timing", {})
        variant = meta["variant"]
        label = report.get("paper_label", "") if report else ("dense" if meta["kind"] == "dense" else "")
        objective = None
        if meta["weights"] is not None:
            objective = {**(objectives or {}).get(meta["objective"], {}), "weights": meta["weights"]}
        paper_fid, where = (None, "") if meta["kind"] in ("reuse", "sampler") else \
            paper_value(dense_model, label, meta["criterion"], objective)
        out.append({
            "experiment": experiment,
            "dataset": dataset,
            "model": variant,
            "criterion": meta["criterion"],
            "channel_ratio": meta["channel_ratio"],
            "pr_label": label,
            "objective": meta["objective"],
            "params_M": eff["params"] / 1e6,
            "macs_G": eff["macs"] / 1e9,
            "images_per_s": eff.get("images_per_s"),
            "fid": fid["fid"],
            "fid_images": fid["num_images"],
            "fid_mode": fid["mode"],
            "training_steps": summary.get("num_steps", 0),
            "batch_size": summary.get("settings", {}).get("training", {}).get("batch_size"),
            # Training cost over all attempts of the job (resumed runs included); absent in
            # summaries written before it was recorded.
            "sec_per_step": timing.get("sec_per_step"),
            "train_minutes": timing["wall_time_s"] / 60 if "wall_time_s" in timing else None,
            "peak_memory_GiB": timing["peak_memory_mib"] / 1024 if timing.get("peak_memory_mib") else None,
            "paper_fid": paper_fid,
            "delta_fid": None if paper_fid is None else fid["fid"] - paper_fid,
            "paper_source": where,
            # Block-reuse and sampler variants sample the scored model ``base_model`` otherwise; their
            # sampler's MACs per image and whole chains per second are set against its below.
            "base_model": meta.get("base"),
            "reuse": meta.get("reuse_method", ""),  # block reuse (reuse.models): the method and its
            "target_mac_fraction": meta.get("mac_fraction"),  # configured share; mac_fraction: the executed one
            # A sampler variant's own sampler (compare_samplers); the others sample as the experiment says.
            "sampler": _sampler_label(meta.get("sample")) if meta["kind"] == "sampler" else None,
            "sampler_steps": eff.get("sampler_steps"),
            "sampling_macs": eff.get("sampling_macs"),
            "sampling_images_per_s": eff.get("sampling_images_per_s"),
            "clip_score": clip.get("clip_score"),
            "clip_model": clip.get("clip_model"),
            "ssim_to_dense": consistency.get("ssim"),
            "psnr_to_dense": consistency.get("psnr"),
            **{column: prdc.get(column) for column in PRDC_COLUMNS},
        })
    at = COLUMNS.index("fid_mode") + 1
    extra = (CLIP_COLUMNS if any(entry.get("clip_score") for entry in rows) else []) + \
        (CONSISTENCY_COLUMNS if any(entry.get("consistency") for entry in rows) else []) + \
        (PRDC_COLUMNS if any(entry.get("prdc") for entry in rows) else [])
    columns = COLUMNS[:at] + extra + COLUMNS[at:]
    table = pd.DataFrame(out, columns=columns + ["sampling_macs"])
    by_model = table.set_index("model")
    reference_model = table.base_model.fillna(table.model)  # a model without a base: its own sampler
    for column, ratio in (("sampling_macs", "mac_fraction"), ("sampling_images_per_s", "sampling_speedup")):
        reference = pd.to_numeric(reference_model.map(by_model[column]), errors="coerce")
        table[ratio] = pd.to_numeric(table[column], errors="coerce") / reference
    table = table.drop(columns=["sampling_macs"])
    # The paper's "Speed" column: network throughput relative to the dense model (GPU jobs only).
    dense_speed = table.loc[table.model == "dense", "images_per_s"]
    if len(dense_speed) and pd.notna(dense_speed.iloc[0]):
        table["speed"] = table.images_per_s / dense_speed.iloc[0]
    return table


def _sampler_label(settings: dict) -> str:
    """'dpm-solver' or, where the entry names its algorithm, 'dpm-solver (dpmsolver)'."""
    return settings["sampler"] + (f" ({settings['algorithm']})" if settings.get("algorithm") else "")


# The printed tables' column headings (the CSV keeps the names).
HEADINGS = {"params_M": "params (M)", "macs_G": "MACs (G)", "images_per_s": "images/s", "fid": "FID",
            "paper_fid": "paper FID", "delta_fid": "Δ FID", "training_steps": "steps", "batch_size": "batch",
            "fid_images": "FID images", "fid_mode": "FID mode", "pr_label": "PR label", "sec_per_step": "s/step",
            "train_minutes": "train min", "peak_memory_GiB": "peak GiB", "channel_ratio": "channel ratio",
            "paper_source": "paper source", "base_model": "base model", "target_mac_fraction": "target MAC share",
            "sampler_steps": "sampler steps", "mac_fraction": "MAC share", "sampling_images_per_s": "samples/s",
            "sampling_speedup": "sampling speed-up", "ssim_to_dense": "SSIM to dense",
            "psnr_to_dense": "PSNR to dense (dB)"}

# The combined table's Markdown (results/tables/all.md, what `make demo` prints): per experiment,
# small tables a terminal shows whole (~100 characters wide for the demo), each of the rows and
# columns that answer one question; the CSV (and each experiment's own table) keeps every column.
# A row is a block-reuse variant where it has a reuse method, a sampler variant where it has a
# sampler of its own, otherwise a model of its own; "quality" holds every row.
SUMMARY_SECTIONS = {
    "models": ["model", "pr_label", "params_M", "macs_G", "fid", "speed", "train_minutes", "paper_fid", "delta_fid"],
    "sampling": ["base_model", "sampler", "sampler_steps", "mac_fraction", "sampling_speedup", "fid"],
    "block reuse": ["base_model", "reuse", "mac_fraction", "sampling_speedup", "fid"],
    "quality": ["model", "clip_score", "clip_model", "ssim_to_dense", "psnr_to_dense", *PRDC_COLUMNS],
}
# Shorter headings where the full ones would widen the summary past a terminal; the legend says
# what they stand for.
SUMMARY_HEADINGS = {"pr_label": "PR", "ssim_to_dense": "SSIM", "psnr_to_dense": "PSNR", "sampling_speedup": "speed-up"}
SUMMARY_LEGEND = """\
Per experiment: its models, other samplers of a model, block reuse and sample quality. Every column
of every model: all.csv beside this file, each experiment's own table (results/tables/<exp>.md) and
the HTML report (snakemake --report). PR: the paper's pruning-ratio label. MAC share and speed-up:
against the base model's own sampler (speed-up and speed: GPU jobs only). SSIM and PSNR (dB): to
the dense model's samples at the same seeds. Precision, recall, density, coverage: Naeem et al.
(2020) on the FID's Inception features. "–": no value.
"""


def summary_sections(table: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """("<experiment> (<dataset>): <section>", its rows and columns) for each SUMMARY_SECTIONS
    section of each experiment that has rows and, besides naming the model, a value to show."""
    table = _blanks_as_missing(table)
    kind = pd.Series("models", index=table.index)
    for column, section in (("sampler", "sampling"), ("reuse", "block reuse")):  # igsm.plan: never both
        if column in table:  # (CSVs written before compare_samplers have no sampler column)
            kind[table[column].notna()] = section
    sections = []
    for (experiment, dataset), rows in table.groupby(["experiment", "dataset"], sort=False, dropna=False):
        for section, columns in SUMMARY_SECTIONS.items():
            picked = rows if section == "quality" else rows[kind[rows.index] == section]
            shown = _with_values(picked[[c for c in columns if c in picked]])
            if len(shown) and set(shown.columns) - {"model", "base_model"}:
                sections.append((f"{experiment} ({dataset}): {section}", shown))
    return sections


def write_tables(table: pd.DataFrame, markdown=None, csv=None, latex=None, title: str = "",
                 summary: bool = False) -> None:
    """The table as CSV (every column), Markdown and LaTeX (every column with a value);
    ``summary``: the Markdown in :func:`summary_sections` instead (the combined table of every
    experiment, results/tables/all.md)."""
    if csv:
        table.to_csv(csv, index=False)
    heading = f"## {title}\n\n" if title else ""
    full = _with_values(_blanks_as_missing(table).drop(columns=["experiment"]))
    if markdown and summary:
        parts = [f"### {name}\n\n{_markdown(shown, SUMMARY_HEADINGS)}" for name, shown in summary_sections(table)]
        Path(markdown).write_text(heading + SUMMARY_LEGEND + "\n" + "\n\n".join(parts) + "\n")
    elif markdown:
        Path(markdown).write_text(heading + _markdown(full) + "\n")
    if latex:
        Path(latex).write_text(_printable(full).to_latex(index=False, float_format="%.2f", na_rep="--"))


def _blanks_as_missing(table: pd.DataFrame) -> pd.DataFrame:
    """Empty strings (no reuse method, no paper source) as missing values, as a CSV read back has them."""
    return table.where(table.ne(""))


def _with_values(shown: pd.DataFrame) -> pd.DataFrame:
    """The one rule for optional columns in every printed table: a column no row has a value for
    (no PRDC, CLIP or SSIM scored, no block reuse, no paper number, no GPU timing) is left out."""
    return shown.loc[:, shown.notna().any()]


def _markdown(shown: pd.DataFrame, headings: dict | None = None) -> str:
    return _printable(shown, headings).to_markdown(index=False, floatfmt=".2f", missingval="–")


def _printable(shown: pd.DataFrame, headings: dict | None = None) -> pd.DataFrame:
    """Columns under their headings; blanks print as "–", not "nan"."""
    shown = _clip_columns_shown(shown.rename(columns={**HEADINGS, **(headings or {})}))
    return shown.astype(object).where(shown.notna(), None)


def _clip_columns_shown(shown: pd.DataFrame) -> pd.DataFrame:
    """The CLIP score's column headed with its CLIP model ("CLIP (openai/clip-vit-large-patch14)")
    where one model made every score; a "CLIP model" column beside it where several did (the
    combined table of experiments scored with different models)."""
    if "clip_score" not in shown:  # none scored (_with_values left the column out)
        return shown
    models = shown.clip_model.dropna().unique()
    if len(models) == 1:
        return shown.drop(columns=["clip_model"]).rename(columns={"clip_score": f"CLIP ({models[0]})"})
    return shown.rename(columns={"clip_score": "CLIP", "clip_model": "CLIP model"})
