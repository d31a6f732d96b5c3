"""A toy pruning method, added by a plugin (config ``plugins:``; issue 30): channels ranked by
torch-pruning's ``FPGMImportance`` (filter pruning via the geometric median, He et al., CVPR 2019),
an importance none of the shipped methods uses. Method ``geometric-median``, criterion ``fpgm``
(it names the pruned model's folder, ``fpgm-cr<ratio>``). It has no phase of its own; the structural
pruning (igsm.pruning.structural) is the package's, as for every method. It declares an extra output,
``params.png`` beside its report (parameters before and after), which the workflow draws for it.

Imports torch only when it prunes: the workflow reads its names while building the DAG.
"""

from __future__ import annotations

from igsm.pruning import PruningMethod, register


class GeometricMedian(PruningMethod):
    name = "geometric-median"
    criteria = ("fpgm",)
    report_picture = "params.png"

    def prune(self, net, images, *, criterion, channel_ratio, settings, schedule, conditioning, folder, device):
        import torch_pruning as tp

        from igsm.data import to_model_range
        from igsm.pruning.structural import prune_with_importance

        # The images only give the input shape for tracing and counting: FPGM reads weights alone.
        x0 = to_model_range(images[:1]).to(device)
        pruned, counts = prune_with_importance(net.to(device), tp.importance.FPGMImportance(p=2),
                                               channel_ratio=channel_ratio, images=x0)
        return pruned, {"criterion": criterion, "channel_ratio": channel_ratio, **counts}

    def draw_report(self, report, path):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        if "pruned_params" not in report:
            raise ValueError("not a pruning report (no 'pruned_params')")
        fig, axis = plt.subplots(figsize=(3, 2.5))
        axis.bar(["dense", "pruned"], [report["dense_params"], report["pruned_params"]])
        axis.set(ylabel="parameters", title=f"FPGM, channel ratio {report['channel_ratio']}")
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)


register(GeometricMedian())
