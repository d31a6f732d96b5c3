"""The registry of pruning methods. A method's job is to produce torch-pruning ``Importance``
scores for the structural pruning (igsm.pruning.structural), possibly after a phase of its own
(Diff-Pruning's gradient accumulation, gradient flow's soft-mask training run). A new method is one
module defining a :class:`PruningMethod` and calling :func:`register` (imported by
igsm/pruning/__init__.py); the schema's ``prune.method`` and ``prune.criterion`` enums, the config
checks, ``igsm prune`` and the workflow read the registry.

The config names a method with ``prune.method``; its criterion (``prune.criterion``, a run's
``criterion``) is one of the method's settings and names the pruned model's folder
(``<criterion>-cr<ratio>``). Without ``prune.method`` the method is the one that takes the criterion.
"""

from __future__ import annotations

from igsm.registry import origin, registered_twice


class PruningMethod:
    """One pruning method. Subclasses set the class attributes and implement :meth:`prune`."""

    name: str = ""
    # The values of prune.criterion (and finetune.runs[].criterion) this method takes.
    criteria: tuple[str, ...] = ()
    # Its own settings under 'prune.<settings_key>' (the schema's $defs.<settings_key>), or None.
    settings_key: str | None = None
    # The file name of a picture of its report, drawn by :meth:`draw_report` beside report.json
    # (results/prune/<exp>/<pruned>/<report_picture>, the workflow's rule prune_report_picture), or None.
    report_picture: str | None = None

    def prune(self, net, images, *, criterion: str, channel_ratio: float, settings, schedule,
              conditioning, folder, device) -> tuple:
        """(pruned copy of ``net``, report) at ``channel_ratio``. ``images``: the training images
        (uint8 N×H×W×C, an image store with its labels); ``settings``: the experiment's 'prune'
        section, typed and filled with the schema's defaults (igsm.stages.settings.PruneSettings:
        this method's own section in ``settings.sections[settings_key]``); ``schedule``: the
        experiment's forward process; ``conditioning``: its conditioning (igsm.conditioning; None if
        unconditional), whose ``data_condition`` of the images' labels a conditional network needs
        wherever it runs on them; ``folder``: where the pruned model goes, for files of a resumable
        phase."""
        raise NotImplementedError(f"pruning method {self.name!r} does not implement prune()")

    def draw_report(self, report: dict, path) -> None:
        """Draw ``report`` (what :meth:`prune` returned, read back from report.json) into the PNG
        ``path``; for a method with a ``report_picture``. A ValueError if the report is not one of
        this method's."""
        raise NotImplementedError(f"pruning method {self.name!r} declares no report picture")


METHODS: dict[str, PruningMethod] = {}


def register(method: PruningMethod) -> PruningMethod:
    """Add ``method`` under its name; a ValueError naming both members where its name or one of its
    criteria (they name result folders) is taken."""
    if not method.name or not method.criteria:
        raise ValueError(f"pruning method {origin(method)}: needs a name and at least one criterion")
    for other in METHODS.values():
        shared = [criterion for criterion in method.criteria if criterion in other.criteria]
        if other.name == method.name or shared:
            what = f"the name {method.name!r}" if other.name == method.name else f"the criterion {shared[0]!r}"
            raise registered_twice("pruning method", method.name, what, other, method)
    METHODS[method.name] = method
    return method


def report_pictures() -> list[str]:
    """The file names of the registered methods' report pictures."""
    return sorted({method.report_picture for method in METHODS.values() if method.report_picture})


def criteria() -> list[str]:
    """Every registered method's criteria, in registration order."""
    return [criterion for method in METHODS.values() for criterion in method.criteria]


def method_for(criterion: str, method: str | None = None, *, criterion_key: str = "prune.criterion",
               method_key: str = "prune.method") -> PruningMethod:
    """The method that prunes with ``criterion``: ``method`` if named (it must take the
    criterion), else the one whose criteria include it. A ValueError naming ``method_key`` or
    ``criterion_key`` otherwise."""
    if method is not None:
        if method not in METHODS:
            raise ValueError(f"{method_key}: unknown pruning method {method!r}; choose one of {', '.join(METHODS)}")
        if criterion not in METHODS[method].criteria:
            raise ValueError(f"{method_key}: {method!r} does not take criterion {criterion!r} ({criterion_key}); "
                             f"its criteria are {', '.join(METHODS[method].criteria)}")
        return METHODS[method]
    for candidate in METHODS.values():
        if criterion in candidate.criteria:
            return candidate
    raise ValueError(f"{criterion_key}: unknown {criterion!r}; valid criteria are {', '.join(criteria())}")
