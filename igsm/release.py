"""Model releases (issue 32, item 3): a folder per released model, its Hugging Face model card, and
its upload to the Hub.

A release folder (results/release/<experiment>/<release>/, igsm.plan.released_models) holds the
model's two files as igsm writes them (``architecture.json``, ``model.safetensors``: igsm.models),
a ``README.md`` model card in the Hub's format and, where diffusers can express the network,
diffusers' ``config.json`` + ``diffusion_pytorch_model.safetensors`` so that
``UNet2DModel.from_pretrained(folder)`` loads it. The card is made with huggingface_hub's
``ModelCard``/``ModelCardData``/``EvalResult`` from the workflow's own files (the FID JSON, the
efficiency JSON, the training summary, the prune report) and the paper's number of the same
experiment where igsm/paper has one (igsm.tables.paper_value).

Pruned U-Nets are not diffusers configs: torch-pruning removes channels layer group by layer group,
and a UNet2DModel config ties widths together that pruning sets apart (the sinusoidal time
projection has ``block_out_channels[0]`` features, pruning keeps the dense count while ``conv_in``
loses channels; an attention's inner width equals its block's channels, pruning narrows it on its
own). :func:`diffusers_form` looks for a config whose network has every layer width of the pruned
one, and names the layers that differ where there is none; such a release loads with
``igsm.models.load_model`` only.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from pathlib import Path

from igsm.models import ARCHITECTURE_FILE, WEIGHTS_FILE
from igsm.tables import paper_value

CARD_FILE = "README.md"
DIFFUSERS_CONFIG = "config.json"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
IGSM_FILES = (ARCHITECTURE_FILE, WEIGHTS_FILE, CARD_FILE)
DIFFUSERS_FILES = (DIFFUSERS_CONFIG, DIFFUSERS_WEIGHTS)
# The Hub's task of a model by its experiment's conditioning.kind (the model-index's task.type).
TASKS = {"none": "unconditional-image-generation", "text": "text-to-image", "captions": "text-to-image",
         "class": "class-conditional-image-generation"}
# Hub dataset ids of the dataset sources that have one: the card's `datasets` links to them.
HUB_DATASETS = {"cifar10": "uoft-cs/cifar10", "fashion-mnist": "zalando-datasets/fashion_mnist"}
# Not uploaded: Snakemake's marker in a directory() output (.snakemake_timestamp), any hidden file.
HIDDEN = [".*"]
# ε̂ of diffusers' loading of a release against igsm's: the same tensors, so float round-off only.
EPS_TOLERANCE = 1e-5
CITATION = Path(__file__).resolve().parents[1] / "CITATION.cff"


class ReleaseError(ValueError):
    """A release or upload that cannot be made; the message names the file or repo id and the cause."""


# ---- diffusers' form of a network ---------------------------------------------------------------

def _candidate_configs(net, config: dict) -> list[dict]:
    """Configs of the network's class that could describe ``net``: its recorded config and, for a
    UNet2DModel, the one whose block widths and time embedding are the pruned network's."""
    candidates = [dict(config)]
    if type(net).__name__ == "UNet2DModel" and hasattr(net, "down_blocks"):
        derived = dict(config)
        derived["block_out_channels"] = [block.resnets[-1].conv2.out_channels for block in net.down_blocks]
        derived["time_embedding_dim"] = net.time_embedding.linear_1.out_features
        if derived != config:
            candidates.append(derived)
    return candidates


def _width_differences(ours: dict, theirs: dict) -> list[str]:
    """One line per layer whose widths differ: '<layer>: <attr> <ours> (config: <theirs>), …' (the
    softmax scale only where nothing else differs: it follows an attention's width)."""
    differences = []
    for name in sorted(set(ours) | set(theirs)):
        a, b = ours.get(name, {}), theirs.get(name, {})
        attrs = [attr for attr in sorted(set(a) | set(b)) if not (
            a.get(attr) == b.get(attr) or (isinstance(a.get(attr), float) and isinstance(b.get(attr), float)
                                           and math.isclose(a[attr], b[attr], rel_tol=1e-9)))]
        if len(attrs) > 1 and "scale" in attrs:
            attrs.remove("scale")
        if attrs:
            differences.append(f"{name}: " + ", ".join(f"{attr} {a.get(attr)} (config: {b.get(attr)})"
                                                       for attr in attrs))
    return differences


def diffusers_form(net, config: dict) -> tuple[dict | None, str]:
    """(the diffusers config that builds a network with every layer width of ``net``, '') or (None,
    why there is none). ``config``: the recorded dense config (architecture.json)."""
    import torch
    from diffusers import ModelMixin

    from igsm.models import layer_widths

    if not isinstance(net, ModelMixin):
        return None, f"it is igsm's own {type(net).__name__}, not a diffusers model"
    ours = layer_widths(net)
    nearest = None
    for candidate in _candidate_configs(net, config):
        try:
            with torch.device("meta"):
                built = type(net)(**candidate)
        except Exception as err:  # a config diffusers rejects (heads that do not divide, …)
            nearest = nearest or [f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"]
            continue
        differences = _width_differences(ours, layer_widths(built))
        if not differences:
            return candidate, ""
        if nearest is None or len(differences) < len(nearest):
            nearest = differences
    # Rarest first: a layer of its own (the time embedding) before the fourth attention of a kind.
    pattern = [re.sub(r"\.\d+", "", re.sub(r"^(down_blocks\.\d+|up_blocks\.\d+|mid_block)\.", "", line.split(":")[0]))
               for line in nearest]
    nearest = [line for _, line in sorted(zip(pattern, nearest), key=lambda pair: pattern.count(pair[0]))]
    shown = "; ".join(nearest[:3]) + (f"; and {len(nearest) - 3} more layer(s)" if len(nearest) > 3 else "")
    return None, (f"no {type(net).__name__} config has its layer widths (pruning set them layer group by "
                  f"layer group; the nearest config differs at {shown})")


def _same_noise_prediction(folder: Path, net) -> str:
    """'' if diffusers' from_pretrained(folder) predicts the noise ``net`` predicts, else why not."""
    import torch

    from igsm.models import condition_inputs, example_condition, image_shape, predict_noise

    try:
        loaded = type(net).from_pretrained(str(folder), low_cpu_mem_usage=False).eval()
    except Exception as err:  # diffusers raises OSError, ValueError, RuntimeError, …
        return f"{type(net).__name__}.from_pretrained fails ({type(err).__name__}: {str(err).splitlines()[0]})"
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, *image_shape(net), generator=generator)
    t = torch.tensor([10, 500])
    keyword = condition_inputs(net, example_condition(net, 2))  # a conditional network's keyword
    with torch.no_grad():
        ours, theirs = predict_noise(net, x, t, **keyword), predict_noise(loaded, x, t, **keyword)
    gap = (ours - theirs).abs().max().item()
    scale = max(ours.abs().max().item(), 1.0)
    return "" if gap <= EPS_TOLERANCE * scale else f"diffusers' loading predicts noise {gap:.2e} away from igsm's"


# ---- the model card -----------------------------------------------------------------------------

def _number(value) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"


def _macs(value) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value:g}"


def fid_name(fid: dict, dataset: str) -> str:
    """The metric's name on the card: 'FID (<n> images, <mode> mode, vs <reference>)'."""
    if fid.get("reference_kind") == "supplied":
        reference = f"supplied statistics {Path(str(fid.get('reference', ''))).name}"
    elif fid.get("reference_dataset"):  # another dataset's images (fid.reference_dataset: COCO val)
        reference = f"{fid.get('num_reference')} images of {fid['reference_dataset']}"
    else:
        reference = f"{fid.get('num_reference')} training images of {dataset}"
    return f"FID ({fid['num_images']} images, {fid['mode']} mode, vs {reference})"


def _weights_text(weights: dict) -> str:
    return ", ".join(f"{term} {float(w):g}" for term, w in weights.items() if float(w))


def citation_text() -> str:
    """The works to cite (CITATION.cff's references and the software itself), one Markdown item each;
    '' where the checkout's CITATION.cff is not there (an installed package)."""
    import yaml

    if not CITATION.is_file():
        return ""
    cff = yaml.safe_load(CITATION.read_text(encoding="utf-8"))
    items = []
    for work in [*cff.get("references", []), cff]:
        names = [" ".join(filter(None, (a.get("given-names"), a.get("family-names")))) or a.get("name", "")
                 for a in work.get("authors", [])]
        where = work.get("conference", {}).get("name") or work.get("url") or ""
        ident = next((i["value"] for i in work.get("identifiers", []) if "value" in i), "")
        items.append("- " + ". ".join(filter(None, (", ".join(names), f"*{work['title']}*", where, ident))) + ".")
    return "\n".join(items)


def model_card(*, row: dict, context: dict, fid: dict | None, efficiency: dict | None, summary: dict | None,
               prune_report: dict | None, diffusers_config: dict | None, diffusers_reason: str,
               paper: tuple[float | None, str]):
    """The release's huggingface_hub ModelCard: metadata (library, tags, datasets, base model and a
    model-index with the FID, for a scored model) and a body with what the model is, its numbers
    beside the paper's where igsm/paper has the same experiment, how to load it and what to cite.

    ``row``: igsm.plan.released_models' row; ``context``: experiment, dataset, dataset_source,
    conditioning_kind, family, base_model (a hub id or None), repo_id (or None)."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    exp, dataset, kind = context["experiment"], context["dataset"], row["kind"]
    name = context.get("repo_id") or f"{exp}/{row['release']}"
    task = TASKS.get(context.get("conditioning_kind", "none"), "image-generation")
    eval_results = None
    if fid is not None:
        eval_results = [EvalResult(
            task_type=task, dataset_type=context.get("dataset_source") or dataset, dataset_name=dataset,
            dataset_split="train", metric_type="fid", metric_value=float(fid["fid"]),
            metric_name=fid_name(fid, dataset),
            metric_config=f"{fid['mode']}-n{fid['num_images']}",
            metric_args={"num_images": fid["num_images"], "mode": fid["mode"],
                         "num_reference": fid.get("num_reference")})]
    tags = ["igsm", "diffusion", context.get("family", "unet"), task] + (["pruning"] if kind != "dense" else [])
    if row["criterion"]:
        tags.append(row["criterion"])
    if row.get("objective") and kind == "finetuned":
        tags.append(f"objective-{row['objective']}")
    hub_dataset = HUB_DATASETS.get(context.get("dataset_source", ""))
    data = ModelCardData(
        library_name="diffusers" if diffusers_config else "igsm", tags=tags, model_name=name,
        datasets=[hub_dataset] if hub_dataset else None, base_model=context.get("base_model") or None,
        pipeline_tag=task if task in ("unconditional-image-generation", "text-to-image") else None,
        eval_results=eval_results)

    if kind == "dense":
        what = "The dense diffusion model trained by the igsm workflow"
    else:
        what = f"A diffusion model pruned by {row['criterion']} at channel ratio {row['channel_ratio']:g}" + (
            f" and finetuned with the objective `{row['objective']}`" if kind == "finetuned" else ", before finetuning")
    lines = [f"# {name}", "",
             f"{what}: experiment `{exp}` of the igsm workflow "
             f"(a {context.get('family_title', 'U-Net')} on the dataset `{dataset}`).", "",
             "| quantity | value |", "|---|---|"]
    if fid is not None:
        lines.append(f"| {fid_name(fid, dataset)} | {fid['fid']:.2f} |")
        paper_fid, where = paper
        if paper_fid is not None:
            lines.append(f"| the paper's FID of the same experiment ({where}) | {paper_fid:g} |")
        if fid.get("sampler"):
            steps = (fid.get("sampler_kwargs") or {}).get("num_steps")
            lines.append(f"| sampler | {fid['sampler']}" + (f", {steps} steps" if steps else "") + " |")
    params = (efficiency or {}).get("params", (prune_report or {}).get("pruned_params"))
    macs = (efficiency or {}).get("macs", (prune_report or {}).get("pruned_macs"))
    if params is not None:
        dense = (prune_report or {}).get("dense_params")
        lines.append(f"| parameters | {_number(params)}" + (f" (dense: {_number(dense)})" if dense else "") + " |")
    if macs is not None:
        dense = (prune_report or {}).get("dense_macs")
        lines.append(f"| MACs (one image, one network call) | {_macs(macs)}"
                     + (f" (dense: {_macs(dense)})" if dense else "") + " |")
    if kind != "dense":
        label = (prune_report or {}).get("paper_label")
        lines.append(f"| pruning | {row['criterion']}, channel ratio {row['channel_ratio']:g}"
                     + (f" (the paper's pruning-ratio label {label})" if label else "") + " |")
    if kind == "finetuned":
        lines.append(f"| objective | `{row['objective']}`: {_weights_text(row['weights'] or {})} (λ: the terms' "
                     "weights) |")
    if kind in ("finetuned", "dense") and summary and summary.get("num_steps") is not None:
        lines.append(f"| {'finetune' if kind == 'finetuned' else 'training'} steps | {summary['num_steps']:,} |")
    if fid is None:
        lines += ["", "The workflow does not sample this model" + (
            " (a pruned model before finetuning is the finetunes' starting point)" if kind == "pruned" else "")
            + ", so its card reports no FID."]
    source = context.get("repo_id") or "DIR"
    get = (f"`hf download {context['repo_id']} --local-dir DIR`, then " if context.get("repo_id") else "")
    lines += ["", "## How to load it", "",
              f"With igsm ({get}the folder's `{ARCHITECTURE_FILE}` and `{WEIGHTS_FILE}`):", "",
              "```python", "from igsm.models import load_model", "", 'net = load_model("DIR")  # ε̂ = net(x_t, t).sample',
              "```", ""]
    if diffusers_config:
        lines += ["With diffusers alone (the folder's `config.json` and `diffusion_pytorch_model.safetensors`):", "",
                  "```python", f"from diffusers import {diffusers_config.get('_class_name', 'UNet2DModel')}", "",
                  f'net = {diffusers_config.get("_class_name", "UNet2DModel")}.from_pretrained("{source}")',
                  "```", ""]
    else:
        lines += [f"diffusers' `from_pretrained` cannot load it: {diffusers_reason}. igsm's loader builds the "
                  f"dense skeleton and applies the widths `{ARCHITECTURE_FILE}` records.", ""]
    cite = citation_text()
    if cite:
        lines += ["## Citation", "", cite, ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


# ---- the release folder -------------------------------------------------------------------------

def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link where the file system allows one (a release does not double the disk the models
    take; nothing writes a model file in place), else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def write_release(out, model_dir, *, row: dict, context: dict, fid: dict | None = None,
                  efficiency: dict | None = None, summary: dict | None = None,
                  prune_report: dict | None = None, objective: dict | None = None) -> dict:
    """Write the release folder ``out`` (made whole in a sibling folder, then renamed): the model's
    files, the card and, where diffusers can express the network and its from_pretrained predicts
    the same noise, diffusers' files. Returns {'files': [...], 'diffusers': bool, 'reason': str}.
    ``objective``: the config's settings of the finetune's objective (the paper's number is that of
    the same settings)."""
    from igsm.models import load_model, read_architecture

    model_dir, out = Path(model_dir), Path(out)
    spec = read_architecture(model_dir)
    net = load_model(model_dir)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name in (ARCHITECTURE_FILE, WEIGHTS_FILE):
        _link_or_copy(model_dir / name, staging / name)
    config, reason = diffusers_form(net, spec["config"])
    if config is not None:
        # The same tensors under diffusers' names: a UNet2DModel's state dict is the module's own.
        config = {"_class_name": type(net).__name__, **config}
        (staging / DIFFUSERS_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        _link_or_copy(model_dir / WEIGHTS_FILE, staging / DIFFUSERS_WEIGHTS)
        reason = _same_noise_prediction(staging, net)
        if reason:
            config = None
            for name in DIFFUSERS_FILES:
                (staging / name).unlink()
    label = "dense" if row["kind"] == "dense" else (prune_report or {}).get("paper_label", "")
    paper = (None, "")
    if fid is not None:
        settings = {**(objective or {}), "weights": row["weights"]} if row["weights"] is not None else None
        paper = paper_value(context.get("dense_model") or "", label, row["criterion"], settings)
    card = model_card(row=row, context=context, fid=fid, efficiency=efficiency, summary=summary,
                      prune_report=prune_report, diffusers_config=config, diffusers_reason=reason, paper=paper)
    card.save(staging / CARD_FILE)
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return {"files": sorted(p.name for p in out.iterdir()), "diffusers": config is not None, "reason": reason}


# ---- publishing ---------------------------------------------------------------------------------

def repo_id_problem(repo_id: str) -> str:
    """Why the Hub would refuse ``repo_id`` (huggingface_hub's own check), '' if it would not."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        return str(err)
    return ""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _cause(err: BaseException) -> str:
    """What went wrong in an upload, in words (offline, no or a refused token, the Hub unreachable)."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    first = str(err).splitlines()[0] if str(err) else ""
    if isinstance(err, OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set"
    if isinstance(err, HfHubHTTPError) and err.response is not None:
        status = err.response.status_code
        if status in (401, 403):
            return (f"the Hub refused the token ({status}: {first}); log in with `hf auth login` or set HF_TOKEN "
                    "to a token that may write there")
        return f"the Hub answered {status} ({first})"
    return f"the Hub is unreachable or failed ({type(err).__name__}: {first})"


def publish_folder(folder, repo_id: str, private: bool = True, revision: str | None = None) -> dict:
    """Upload a release folder to the Hub model repository ``repo_id`` (created if missing, private
    if ``private``; on the branch ``revision``, made if missing, else main) with huggingface_hub
    (HfApi.create_repo + upload_folder). Returns the receipt: repo id, revision, commit url and oid,
    endpoint, each file's sha256. ``ReleaseError`` naming the repo id and the cause otherwise."""
    from huggingface_hub import HfApi, constants, get_token

    folder = Path(folder)
    if not (folder / CARD_FILE).is_file() or not (folder / ARCHITECTURE_FILE).is_file():
        raise ReleaseError(f"publish {repo_id}: {folder} is not a release folder (it needs {CARD_FILE} and "
                           f"{ARCHITECTURE_FILE}; the workflow's results/release/<experiment>/<release>)")
    problem = repo_id_problem(repo_id)
    if problem:
        raise ReleaseError(f"publish {repo_id}: not a valid repo id ({problem})")
    endpoint = constants.ENDPOINT
    where = f"publish {repo_id}: could not upload {folder} to {endpoint}"
    if constants.HF_HUB_OFFLINE:
        raise ReleaseError(f"{where} (HF_HUB_OFFLINE is set; unset it on a machine with internet)")
    if get_token() is None:
        raise ReleaseError(f"{where} (no Hugging Face token: log in with `hf auth login` or set HF_TOKEN)")
    api = HfApi(endpoint=endpoint)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, revision=revision,
                                   commit_message=f"igsm release of {folder.name}", ignore_patterns=HIDDEN)
    except Exception as err:  # huggingface_hub and httpx raise many kinds; each means "not uploaded"
        raise ReleaseError(f"{where} ({_cause(err)})") from None
    return {"repo_id": repo_id, "revision": revision or "main", "private": private, "endpoint": endpoint,
            "commit_url": getattr(commit, "commit_url", None), "commit_oid": getattr(commit, "oid", None),
            "files": {p.name: sha256_of(p) for p in sorted(folder.iterdir())
                      if p.is_file() and not p.name.startswith(".")}}
