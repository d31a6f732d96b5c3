"""The release stage (issue 32, item 3): a released model's folder with its Hugging Face model card
(igsm.release), and its upload to the Hub."""

from __future__ import annotations

import json
from pathlib import Path

from igsm.stages.common import StageError, write_json


def _read(path, what: str) -> dict | None:
    if path is None:
        return None
    try:
        payload = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StageError(f"--{what}: {path} is not readable JSON ({str(err).splitlines()[0]}); rerun the "
                         "workflow, which remakes it") from None
    if not isinstance(payload, dict):
        raise StageError(f"--{what}: {path} holds no JSON object; rerun the workflow, which remakes it")
    return payload


def release(model_dir, out, fid, efficiency, summary, prune_report, settings: dict) -> str:
    """Write the release folder ``out`` of the model in ``model_dir``: its files, a model card from the
    FID, efficiency, training summary and prune report JSON files (each where the model has one) and,
    where diffusers can load the network, diffusers' files. ``settings``: ``row`` (igsm.plan's
    released_models row), ``context`` (experiment, dataset, …; igsm.release.model_card) and
    ``objective`` (the finetune objective's settings, or null)."""
    from igsm.release import ReleaseError, write_release

    for key in ("row", "context"):
        if not isinstance(settings.get(key), dict):
            raise StageError(f"--settings: needs a JSON object '{key}' (the workflow's release rule gives it)")
    try:
        made = write_release(out, model_dir, row=settings["row"], context=settings["context"],
                             fid=_read(fid, "fid"), efficiency=_read(efficiency, "efficiency"),
                             summary=_read(summary, "summary"), prune_report=_read(prune_report, "prune-report"),
                             objective=settings.get("objective"))
    except (ReleaseError, ValueError, OSError) as err:
        raise StageError(str(err)) from None
    loads = "with diffusers' from_pretrained too" if made["diffusers"] else f"with igsm only ({made['reason']})"
    return f"{out}: {', '.join(made['files'])}; loads {loads}"


def publish(folder, repo_id: str, private: bool, revision: str | None, receipt) -> str:
    """Upload a release folder to the Hub repository ``repo_id`` (igsm.release.publish_folder) and, if
    ``receipt`` is given, write what was uploaded there (repo id, commit, each file's sha256)."""
    from igsm.release import ReleaseError, publish_folder

    try:
        made = publish_folder(folder, repo_id, private=private, revision=revision)
    except ReleaseError as err:
        raise StageError(str(err)) from None
    if receipt:
        write_json(receipt, made)
    return f"{repo_id}: {made['commit_url']}"
