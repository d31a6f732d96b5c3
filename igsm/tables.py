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
           "paper_source", "reuse", "sampler", "sampler_steps", "mac_fraction", "sampling_images_per_s",
           "sampling_speedup"]
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
            # Block reuse (experiments with reuse.models): the sampler's MACs per image and whole
            # chains per second, against the base model's below.
            "reuse": meta.get("reuse_method", ""),
            # A sampler variant's own sampler (compare_samplers); the others sample as the experiment says.
            "sampler": _sampler_label(meta.get("sample")) if meta["kind"] == "sampler" else None,
            "sampler_steps": eff.get("sampler_steps"),
            "sampling_macs": eff.get("sampling_macs"),
            "sampling_images_per_s": eff.get("sampling_images_per_s"),
            "base": meta.get("base", variant),
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
    table = pd.DataFrame(out, columns=columns + ["sampling_macs", "base"])
    base = table.set_index("model")
    for column, ratio in (("sampling_macs", "mac_fraction"), ("sampling_images_per_s", "sampling_speedup")):
        reference = pd.to_numeric(table.base.map(base[column]), errors="coerce")
        table[ratio] = pd.to_numeric(table[column], errors="coerce") / reference
    table = table.drop(columns=["sampling_macs", "base"])
    # The paper's "Speed" column: network throughput relative to the dense model (GPU jobs only).
    dense_speed = table.loc[table.model == "dense", "images_per_s"]
    if len(dense_speed) and pd.notna(dense_speed.iloc[0]):
        table["speed"] = table.images_per_s / dense_speed.iloc[0]
    return table


def _sampler_label(settings: dict) -> str:
    """'dpm-solver' or, where the entry names its algorithm, 'dpm-solver (dpmsolver)'."""
    return settings["sampler"] + (f" ({settings['algorithm']})" if settings.get("algorithm") else "")


# The combined table's Markdown (results/tables/all.md, what `make demo` prints): the columns a reader
# compares across experiments, each shown only where some row has a value; the CSV keeps them all.
SUMMARY_COLUMNS = ["experiment", "model", "PR label", "params (M)", "MACs (G)", "FID", "FID images", "CLIP",
                   "SSIM to dense", *PRDC_COLUMNS, "speed", "sampler", "sampler steps", "MAC share",
                   "sampling speed-up", "paper FID", "Δ FID"]


def write_tables(table: pd.DataFrame, markdown=None, csv=None, latex=None, title: str = "",
                 summary: bool = False) -> None:
    """The table as CSV (every column), Markdown and LaTeX; ``summary``: the Markdown and LaTeX show
    SUMMARY_COLUMNS only (the combined table of every experiment)."""
    if csv:
        table.to_csv(csv, index=False)
    shown = table.drop(columns=[] if summary else ["experiment"]).rename(columns={
        "params_M": "params (M)", "macs_G": "MACs (G)", "images_per_s": "images/s", "speed": "speed", "fid": "FID", "paper_fid": "paper FID",
        "delta_fid": "Δ FID", "training_steps": "steps", "batch_size": "batch", "fid_images": "FID images",
        "fid_mode": "FID mode", "pr_label": "PR label", "sec_per_step": "s/step",
        "train_minutes": "train min", "peak_memory_GiB": "peak GiB", "channel_ratio": "channel ratio",
        "paper_source": "paper source", "sampler_steps": "sampler steps", "mac_fraction": "MAC share",
        "sampling_images_per_s": "samples/s", "sampling_speedup": "sampling speed-up",
        "ssim_to_dense": "SSIM to dense", "psnr_to_dense": "PSNR to dense (dB)"})
    # Experiments not compared with their dense samples, without PRDC or with one sampler (the combined
    # table) show no such columns.
    shown = shown.drop(columns=[c for c in ("SSIM to dense", "PSNR to dense (dB)", *PRDC_COLUMNS, "sampler")
                                if c in shown and shown[c].isna().all()])
    if not table.reuse.astype(bool).any():  # no block reuse in this experiment: its columns stay out,
        # the sampler's unless its models differ in sampler (compare_samplers: their efficiency counts it)
        shown = shown.drop(columns=["reuse"] + [c for c in ("sampler steps", "MAC share", "samples/s",
                                                            "sampling speed-up") if shown[c].isna().all()])
    shown = _clip_columns_shown(shown)
    legend = ""
    if summary:
        def rank(column):  # SUMMARY_COLUMNS' order; "CLIP (<model>)" where "CLIP" stands
            return SUMMARY_COLUMNS.index("CLIP" if column.startswith("CLIP (") else column)

        kept = [c for c in shown if (c in SUMMARY_COLUMNS or c.startswith("CLIP (")) and shown[c].notna().any()]
        shown = shown[sorted(kept, key=rank)]
        legend = ("The main columns; every column of every model: all.csv beside this file, and each "
                  "experiment's own table (results/tables/<experiment>.md).\n\n")
    shown = shown.astype(object).where(shown.notna(), None)  # blanks print as "–", not "nan"
    if markdown:
        text = shown.to_markdown(index=False, floatfmt=".2f", missingval="–")
        Path(markdown).write_text((f"## {title}\n\n" if title else "") + legend + text + "\n")
    if latex:
        Path(latex).write_text(shown.to_latex(index=False, float_format="%.2f", na_rep="--"))


def _clip_columns_shown(shown: pd.DataFrame) -> pd.DataFrame:
    """The CLIP score's column headed with its CLIP model ("CLIP (openai/clip-vit-large-patch14)")
    where one model made every score; a "CLIP model" column beside it where several did (the
    combined table of experiments scored with different models); neither where no row has a score
    (the combined table of experiments without one, or a CSV written before the column existed)."""
    if "clip_score" not in shown:
        return shown
    if shown.clip_score.isna().all():
        return shown.drop(columns=CLIP_COLUMNS)
    models = shown.clip_model.dropna().unique()
    if len(models) == 1:
        return shown.drop(columns=["clip_model"]).rename(columns={"clip_score": f"CLIP ({models[0]})"})
    return shown.rename(columns={"clip_score": "CLIP", "clip_model": "CLIP model"})
