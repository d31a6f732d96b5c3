"""The paper's tables rebuilt from the workflow's own files (issue 15; paper Tables 1-5 of Sec. 5,
Tables 8, 9 of App. C, Tables 10-12 of App. D and Table 13 of App. E), in the paper's rows and
columns, each cell with the published value, ours, the difference and where ours came from.

``paper_tables.yaml`` holds the layout and every published number the project uses; ours come
from the per-experiment tables (``results/tables/<exp>.csv``, igsm/tables.py), i.e. from the FID,
efficiency and training-summary JSON files of each scored model. The same file gives the rest of
the package the paper's numbers: the pruning-ratio labels (:func:`pruning_points`, igsm/pruning/structural.py)
and the per-experiment tables' paper column (:func:`published_fids`, igsm/tables.py). Every cell is
one of:

* ``ours``: a number from the named experiment's model (its source says which, and for FID the
  mode and sample count);
* ``quoted``: a row of a method this workflow does not run (DeepCache, O2MKD, SparseDM), the
  paper's numbers only;
* ``missing``: the experiment is not in the config, or the model was not scored — never a number;
* ``none``: a λ_Jac the paper did not run at that pruning ratio (Table 10's blank cells);
* ``untranscribed``: a column of the row's ``untranscribed`` list: the paper's value (if it prints
  one) is not transcribed because its text extraction cannot be read (Table 4) — never a paper
  number; ours as for ``ours`` where that model is scored (its source says which), else none.

Where two tables print different values for the same model and measure (the paper disagrees with
itself), a cell's ``paper_other`` shows the other table's ("Table 10: 6.49").
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pandas as pd
import yaml

from igsm.plan import variant_of

SPEC = Path(__file__).with_name("tables.yaml")
LONG_COLUMNS = ["table", "section", "method", "column", "paper", "paper_other", "ours", "delta", "status",
                "source", "note", "differs"]
# The default config: the experiments and objectives the spec's `ours` name.
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "config" / "config.yaml"
# The paper's figures drawn from its tables: figure → (table, igsm.plots function name).
FIGURES = {"fid_vs_ratio": ("table5", "plot_fid_vs_ratio"), "fid_vs_lambda": ("table10", "plot_fid_vs_lambda")}


@functools.lru_cache(maxsize=1)
def load_spec() -> dict:
    return yaml.safe_load(SPEC.read_text())


def table_names() -> list[str]:
    return list(load_spec()["tables"])


def field_of(column: str) -> str:
    """The per-experiment table's field a column shows ("fid@1e-2" → "fid")."""
    return column.split("@")[0]


def heading_of(column: str, table: str | None = None) -> str:
    """A column's heading; a table's ``headings`` name what its λ_Jac = 0 column is (NP or NP + KD)."""
    if table and column in load_spec()["tables"][table].get("headings", {}):
        return load_spec()["tables"][table]["headings"][column]
    if "@" in column:
        return f"FID λ={column.split('@')[1]}"
    return load_spec()["columns"][column]


def table_label(name: str) -> str:
    """"table10" → "Table 10"."""
    return f"Table {name.removeprefix('table')}"


def _find_row(ref: dict) -> tuple[str, dict]:
    """(section name, row) of the row a cross-table reference ({table, [section,] row, column}) names."""
    found = [(section.get("name", ""), row) for section in load_spec()["tables"][ref["table"]]["sections"]
             if ref.get("section", section.get("name", "")) == section.get("name", "")
             for row in section["rows"] if row["method"] == ref["row"]]
    if len(found) != 1:
        raise ValueError(f"igsm/paper/tables.yaml: {ref} names {len(found)} rows, not one")
    return found[0]


@functools.lru_cache(maxsize=1)
def _disagreements() -> dict:
    """{(table, section, method, column): ["Table 10: 6.49", …]}: each `disagrees` link, shown on
    both of its cells."""
    links = {}

    def show(cell, name, row, column):
        value = row.get("paper", {}).get(column)
        if value is None:
            raise ValueError(f"igsm/paper/tables.yaml: a `disagrees` link names {table_label(name)} "
                             f"{row['method']!r} {column}, a cell without a published value")
        text = f"{table_label(name)}: {_number(value, column)}"
        if text not in links.setdefault(cell, []):
            links[cell].append(text)

    for name, table in load_spec()["tables"].items():
        for section in table["sections"]:
            for row in section["rows"]:
                for column, ref in row.get("disagrees", {}).items():
                    other_section, other = _find_row(ref)
                    show((name, section.get("name", ""), row["method"], column), ref["table"], other, ref["column"])
                    show((ref["table"], other_section, ref["row"], ref["column"]), name, row, column)
    return links


def paper_cell(name: str, section: dict, row: dict, column: str) -> tuple[float | None, str]:
    """(published value, what other tables print for the same model and measure) of a cell."""
    other = "; ".join(_disagreements().get((name, section.get("name", ""), row["method"], column), []))
    return row.get("paper", {}).get(column), other


def _model_of(row: dict, column: str) -> dict | None:
    """The model behind a cell, by its columns ({experiment, criterion, channel_ratio, objective}):
    the row's `ours`, or for a λ_Jac column ("fid@λ") `ours` with what the row's `models` give for
    that column (λ 0: the row's own model, whose objective the table's `headings` state); None: no
    such run."""
    if column in row.get("models", {}):
        return {**row["ours"], **row["models"][column]}
    if "@" in column and column.split("@")[1] != "0":
        return None
    return row["ours"]


def variant(model: dict) -> str:
    """A model's name in result paths and per-experiment tables (igsm.plan.variant_of)."""
    return variant_of(model.get("criterion", ""), model.get("channel_ratio"), model["objective"])


def _rows_of(frame: pd.DataFrame, model: dict) -> pd.DataFrame:
    """The rows of a per-experiment table that hold ``model``, chosen by its columns (criterion,
    channel ratio, objective; the dense and untrained models by objective alone), never a block-reuse
    or sampler variant of it."""
    def text(column):
        return frame[column].fillna("").astype(str) if column in frame else pd.Series("", index=frame.index)
    chosen = (text("objective") == model["objective"]) & (text("reuse") == "") & (text("sampler") == "")
    if model["objective"] not in ("dense", "untrained"):
        chosen &= (text("criterion") == model["criterion"]) & (frame.channel_ratio == model["channel_ratio"])
    return frame[chosen]


# The paper's qualitative figures: sample grids side by side, a row per section (dataset) of these
# tables, a column per method.
SAMPLE_FIGURES = {"samples_unet": "table1", "samples_uvit": "table2"}
SAMPLE_METHODS = {"Dense": "dense", "U-ViT": "dense", "Diff-Pruning": "Diff-Pruning", "IGSM": "IGSM"}


def sample_grids(name: str, experiments) -> dict[str, dict[str, str]]:
    """{section: {column: grid.png path}} of a sample figure, for the experiments of the config."""
    out = {}
    for section in load_spec()["tables"][SAMPLE_FIGURES[name]]["sections"]:
        for row in section["rows"]:
            column = SAMPLE_METHODS.get(row["method"])
            target = row.get("ours")
            if column and target and target["experiment"] in experiments:
                out.setdefault(section["name"], {})[column] = (
                    f"results/samples/{target['experiment']}/{variant(target)}/grid.png")
    return out


def printed_as(count: float, printed: float) -> bool:
    """Whether a count (in the paper's unit, M or G) is what the paper prints as ``printed``: within
    one unit of its last printed digit (the paper rounds or truncates: 19.85M → "19.8M")."""
    text = repr(printed)
    unit = 10.0 ** -len(text.split(".")[1]) if "." in text else 1.0
    return abs(count - printed) <= unit + 1e-9


@functools.lru_cache(maxsize=1)
def pruning_points() -> tuple[tuple[tuple[float, float], float, tuple[float, float]], ...]:
    """((dense params M, MACs G), PR label, (pruned params M, MACs G)) for every pruned model whose
    counts a table prints in a section that also prints its dense model (``pr: 0``): the paper's
    pruning ratios, which are not one formula of the counts (igsm/pruning/structural.py paper_label)."""
    points = []
    for table in load_spec()["tables"].values():
        for section in table["sections"]:
            rows = [r for r in section["rows"] if "pr" in r and {"params_M", "macs_G"} <= set(r.get("paper", {}))]
            for dense in (r for r in rows if r["pr"] == 0):
                for row in rows:
                    point = ((dense["paper"]["params_M"], dense["paper"]["macs_G"]), row["pr"],
                             (row["paper"]["params_M"], row["paper"]["macs_G"]))
                    if row["pr"] != 0 and point not in points:
                        points.append(point)
    return tuple(points)


@functools.lru_cache(maxsize=1)
def published_fids() -> tuple[dict, ...]:
    """Every published FID of a model the default config runs (and ``other_published``), in terms a
    per-experiment table can match without the config's names (igsm/tables.py paper_value):
    {dense (the pretrained model), pr (None: the dense model), criterion, objective (its settings in
    the default config), fid, where ("IGSM Table 5 (DP, PR 0.56; Table 10: 6.49)")}; in table order,
    so a model several tables print is matched to the first. Untranscribed cells are left out."""
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    experiments, objectives = config["experiments"], config["objectives"]

    def entry(model, pr, fid, where):
        dense = experiments[model["experiment"]]["dense"]["pretrained"]
        if model["objective"] == "dense":
            return {"dense": dense, "pr": None, "criterion": "", "objective": None, "fid": fid, "where": where}
        return {"dense": dense, "pr": pr, "criterion": model["criterion"], "objective": objectives[model["objective"]],
                "fid": fid, "where": where}

    found = []
    for name, table in load_spec()["tables"].items():
        for section in table["sections"]:
            for row in section["rows"]:
                if row.get("quoted"):
                    continue
                for column in table["columns"]:
                    model = _model_of(row, column)
                    if field_of(column) != "fid" or model is None or column in row.get("untranscribed", ()):
                        continue
                    paper, other = paper_cell(name, section, row, column)
                    if paper is None:
                        continue
                    what = row["method"] + (f", λ_Jac {column.split('@')[1]}" if "@" in column else "")
                    where = f"IGSM {table_label(name)} ({what}{'; ' + other if other else ''})"
                    found.append(entry(model, row["pr"], paper, where))
    for other in load_spec().get("other_published", []):
        found.append({"dense": experiments[other["experiment"]]["dense"]["pretrained"], "pr": other["pr"],
                      "criterion": other["criterion"], "objective": objectives[other["objective"]],
                      "fid": other["fid"], "where": other["where"]})
    return tuple(found)


def experiments_of(name: str) -> list[str]:
    """The experiments a table reads, in the order they first appear."""
    found = []
    for section in load_spec()["tables"][name]["sections"]:
        for row in section["rows"]:
            exp = row.get("ours", {}).get("experiment")
            if exp and exp not in found:
                found.append(exp)
    return found


def _ours(frame: pd.DataFrame, model: dict, column: str):
    rows = _rows_of(frame, model)
    if rows.empty:
        return None
    row = rows.iloc[0]
    column = field_of(column)
    if column == "train_hours":
        value = row.get("train_minutes")
        return None if value is None or pd.isna(value) else float(value) / 60
    value = row.get(column)
    return None if value is None or pd.isna(value) else float(value)


def _source(frame: pd.DataFrame, exp: str, model: dict, column: str) -> str:
    row = _rows_of(frame, model).iloc[0]
    if field_of(column) != "fid":
        return f"{exp}/{row.model}"
    return f"{exp}/{row.model}, FID {row.fid_mode}, {int(row.fid_images)} images"


def _count(value: float) -> str:
    """800k, 0.5M, 1,000, 128."""
    if value >= 1e6:
        return f"{value / 1e6:g}M"
    return f"{value / 1e3:g}k" if value >= 1e4 else f"{int(value):,}"


def differences(exp: str, frame: pd.DataFrame, models: list[dict]) -> str:
    """How the row's models ran otherwise than the paper's numbers (``paper_settings``): finetune
    steps (not for the pretrained dense model) and FID sample counts; "" when as the paper."""
    paper = load_spec().get("paper_settings", {}).get(exp, {})
    found = []
    for model in models:
        rows = _rows_of(frame, model)
        if rows.empty:
            continue
        row = rows.iloc[0]
        steps, images = row.get("training_steps"), row.get("fid_images")
        if model["objective"] != "dense" and "training_steps" in paper and pd.notna(steps) \
                and steps != paper["training_steps"]:
            found.append(f"{row.model}: {_count(steps)} finetune steps (paper {_count(paper['training_steps'])})")
        if "fid_images" in paper and pd.notna(images) and images != paper["fid_images"]:
            found.append(f"{row.model}: FID on {_count(images)} images (paper {_count(paper['fid_images'])})")
    return "; ".join(dict.fromkeys(found))


def build(name: str, experiment_tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per cell of table ``name``; ``experiment_tables`` maps the experiments of the
    config to their per-experiment tables (an experiment the config lacks is simply absent)."""
    spec = load_spec()["tables"][name]
    cells = []
    for section in spec["sections"]:
        for row in section["rows"]:
            target = row.get("ours")
            differs = ""
            if target and target["experiment"] in experiment_tables:
                used = [m for m in (_model_of(row, c) for c in spec["columns"]) if m]
                differs = differences(target["experiment"], experiment_tables[target["experiment"]], used)
            for column in spec["columns"]:
                paper, paper_other = paper_cell(name, section, row, column)
                cell = {"table": name, "section": section.get("name", ""), "method": row["method"],
                        "column": column, "paper": paper, "paper_other": paper_other,
                        "ours": None, "delta": None, "source": "", "note": row.get("note", ""), "differs": differs}
                model = None if row.get("quoted") else _model_of(row, column)
                if row.get("quoted"):
                    cell.update(status="quoted", source="paper (a method this workflow does not run)")
                elif model is None:  # a λ_Jac the paper did not run at this ratio
                    cell.update(status="none", source="not in the paper")
                elif target["experiment"] not in experiment_tables:
                    cell.update(status="missing", source=f"experiment {target['experiment']} is not in the config")
                else:
                    frame = experiment_tables[target["experiment"]]
                    ours = _ours(frame, model, column)
                    if not _rows_of(frame, model).empty:
                        cell["source"] = _source(frame, target["experiment"], model, column)
                        cell.update(status="ours" if ours is not None else "missing", ours=ours)
                        if ours is None:
                            cell["source"] += " (no value recorded)"
                    else:
                        cell.update(status="missing", source=f"{target['experiment']} scores no model {variant(model)}")
                    if ours is not None and paper is not None:
                        cell["delta"] = ours - paper
                if column in row.get("untranscribed", ()):
                    source = NOT_RUN if model is None else cell["source"]
                    cell.update(status="untranscribed", paper=None, paper_other="", delta=None,
                                source=f"{source}; the paper's value not transcribed")
                cells.append(cell)
    return pd.DataFrame(cells, columns=LONG_COLUMNS)


# The source of an untranscribed cell whose λ_Jac this workflow does not run at that ratio.
NOT_RUN = "not run here"

# Counts, printed as counts (800k, 0.5M, 128) and compared without a difference.
COUNT_COLUMNS = ("training_steps", "batch_size")


def _number(value, column: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return _count(float(value)) if column in COUNT_COLUMNS else f"{float(value):.2f}"


def _wide(cells: pd.DataFrame, latex: bool = False) -> pd.DataFrame:
    """The paper's layout: a row per method, a column per metric, each cell "ours / paper"."""
    out = []
    for (section, method), group in cells.groupby(["section", "method"], sort=False):
        line = {"section": section, "method": method}
        for _, cell in group.iterrows():
            paper = _number(cell.paper, cell.column)
            if isinstance(cell.paper_other, str) and cell.paper_other:  # what other tables print instead
                paper += f" [{cell.paper_other}]"
            if cell.status == "none":
                text = "–"
            elif cell.status == "quoted":
                text = f"{paper} (quoted)"
            elif cell.status == "missing":
                text = f"missing / {paper}"
            elif cell.status == "untranscribed":  # ours: a number, "missing" (not scored) or "–" (not run)
                ours = "missing" if pd.isna(cell.ours) and not cell.source.startswith(NOT_RUN) else None
                text = f"{ours or _number(cell.ours, cell.column)} / n.t."
            else:
                text = f"{_number(cell.ours, cell.column)} / {paper}"
                if cell.column not in COUNT_COLUMNS and not pd.isna(cell.delta):
                    text += f" ({cell.delta:+.2f})"
            line[heading_of(cell.column, cell.table)] = text
        notes = [group.note.iloc[0], group.differs.iloc[0] and f"† ours differ: {group.differs.iloc[0]}"]
        line["note"] = "; ".join(n for n in notes if isinstance(n, str) and n)
        out.append(line)
    frame = pd.DataFrame(out)
    for column in ("section", "note"):  # columns with nothing in them
        if not frame[column].astype(bool).any():
            frame = frame.drop(columns=column)
    return frame


def write(name: str, cells: pd.DataFrame, markdown=None, csv=None, latex=None) -> None:
    """CSV: one line per cell (machine-readable); Markdown and LaTeX (booktabs): the paper's layout,
    every cell "ours / paper (ours − paper)"."""
    title = load_spec()["tables"][name]["title"]
    if csv:
        cells.to_csv(csv, index=False)
    wide = _wide(cells)
    if markdown:
        legend = ("Each cell: ours / paper (ours − paper). \"quoted\": a method this workflow does not "
                  "run, the paper's number; \"missing\": not run (see the CSV's source column).")
        if (cells.status == "untranscribed").any():
            legend += (" \"n.t.\": the paper's value not transcribed (its text extraction cannot be read; "
                       "igsm/paper/tables.yaml).")
        if cells.paper_other.fillna("").astype(bool).any():
            legend += " \"[Table N: x]\": the paper disagrees with itself: Table N prints x for the same model."
        if (cells.column == "peak_memory_GiB").any():
            legend += " Memory: the paper's \"G\"; ours, the finetune's peak GPU memory in GiB."
        Path(markdown).write_text(f"## {title}\n\n{legend}\n\n" + wide.to_markdown(index=False) + "\n")
    if latex:
        if (cells.status == "untranscribed").any():
            title += " (n.t.: the paper's value not transcribed)"
        body = wide.to_latex(index=False, escape=True, caption=title, label=f"tab:{name}")
        Path(latex).write_text(body)
