"""Block reuse against its published numbers (issue 31, item 7): an experiment's block-reuse
variants beside the DiP-GO paper's results for the same pretrained model, sampler and MAC share
(``reuse_published`` in igsm/paper/tables.yaml; DiP-GO's SD-1.5 headline: CLIP score 30.16 on 5k
COCO prompts at 0.8 of the MACs pruned, 50 DDIM steps, 4.4× faster).

Ours come from the experiment's table (``results/tables/<exp>.csv``, igsm/tables.py: the FID,
CLIP-score and efficiency JSON of each model); a published number stands beside the row of the
same method reusing the pretrained (dense) model at the same executed share. Nothing is typed in
here: a row the workflow has not scored shows no number of ours.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from igsm.paper.tables import load_spec

COLUMNS = ["model", "reuse", "target_mac_share", "mac_share", "sampler_steps", "fid", "fid_images", "clip_score",
           "paper_clip_score", "delta_clip_score", "sampling_speedup", "paper_speedup", "paper_source"]
HEADINGS = {"model": "model", "reuse": "reuse", "target_mac_share": "target MAC share",
            "mac_share": "MAC share", "sampler_steps": "sampler steps", "fid": "FID", "fid_images": "FID images",
            "clip_score": "CLIP (ours)", "paper_clip_score": "CLIP (published)", "delta_clip_score": "Δ CLIP",
            "sampling_speedup": "speed-up (ours)", "paper_speedup": "speed-up (published)",
            "paper_source": "published in"}


def published_for(pretrained: str, sampler: str, num_steps: int) -> list[dict]:
    """The published block-reuse results of ``pretrained`` (a hub id) sampled by ``sampler`` in
    ``num_steps`` steps."""
    return [entry for entry in load_spec().get("reuse_published", [])
            if pretrained in entry["pretrained"] and entry["sampler"] == sampler and entry["num_steps"] == num_steps]


def _published_row(entries: list[dict], base: str, method: str, target: float) -> dict | None:
    """The published result of ``method`` reusing the pretrained model at executed share ``target``."""
    for entry in entries:
        if base == "dense" and method == entry["method"] and abs(target - (1 - entry["pruned_macs"])) < 1e-9:
            return entry
    return None


def comparison(table: pd.DataFrame, entries: list[dict]) -> pd.DataFrame:
    """A row per block-reuse variant of the experiment's table ``table`` and per model it reuses
    (its full sampler, share 1), with the published CLIP score and speed-up where ``entries`` have
    the same method at the same share. Which model a variant reuses, by which method and at which
    configured share: the table's own columns (igsm.plan's rows, through the variant's metadata)."""
    if "base_model" not in table:
        raise ValueError("the experiment's table predates its base_model column: rebuild it "
                         "(snakemake --forcerun tables)")
    methods = table.reuse.where(table.reuse.notna(), "")  # "" (or blank in a CSV): no block reuse
    reused = set(table.base_model[methods != ""])
    rows = []
    for (_, row), method in zip(table.iterrows(), methods):
        if not method and row.model not in reused:
            continue
        base, target = (row.base_model, row.target_mac_fraction) if method else (row.model, 1.0)
        published = _published_row(entries, base, method, target) if method else None
        ours_clip = row.get("clip_score")
        paper_clip = published.get("clip_score") if published else None
        rows.append({
            "model": row.model, "reuse": method or "full sampler", "target_mac_share": target,
            "mac_share": row.get("mac_fraction"), "sampler_steps": row.get("sampler_steps"),
            "fid": row.get("fid"), "fid_images": row.get("fid_images"), "clip_score": ours_clip,
            "paper_clip_score": paper_clip,
            "delta_clip_score": (ours_clip - paper_clip) if paper_clip is not None and pd.notna(ours_clip) else None,
            "sampling_speedup": row.get("sampling_speedup"),
            "paper_speedup": published.get("speedup") if published else None,
            "paper_source": (f"{published['where']} ({published['prompts']}, {published['num_steps']} "
                             f"{published['sampler'].upper()} steps)") if published else "",
        })
    return pd.DataFrame(rows, columns=COLUMNS)


def write(cells: pd.DataFrame, experiment: str, markdown=None, csv=None, clip_model: str = "") -> None:
    """CSV (machine-readable) and Markdown of :func:`comparison`; ``clip_model``: ours's CLIP model."""
    if csv:
        cells.to_csv(csv, index=False)
    if markdown:
        shown = cells.rename(columns=HEADINGS)
        legend = ("Our block-reuse variants beside the published results of the same method, pretrained model, "
                  "sampler and MAC share (igsm/paper/tables.yaml `reuse_published`). MAC share: the executed "
                  "share of the full sampler's MACs (1 − the pruned share); speed-up: whole sampling chains per "
                  "second against the model's full sampler (measured on GPU jobs only)."
                  + (f" Our CLIP scores: {clip_model}." if clip_model else "") + " \"–\": not measured or not published.")
        Path(markdown).write_text(f"## Block reuse against published results: {experiment}\n\n{legend}\n\n"
                                  + shown.to_markdown(index=False, missingval="–", floatfmt=".4g") + "\n")
