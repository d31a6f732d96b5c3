"""Structural pruning (igsm.pruning.structural) and gradient-flow pruning (igsm.pruning.gradient_flow)."""

from igsm.pruning.structural import (CRITERIA, count_params_macs, criterion_importance, metapruner,  # noqa: F401
                                     paper_label, prune, tp_version)
