"""Pruning of diffusion models: the structural pruning with torch-pruning (structural.py) and the
pruning methods that rank its channels, one module each, registered in methods.py: Diff-Pruning and
its ablation's criteria (diff_pruning.py), gradient flow (gradient_flow.py, its soft masks in
soft_masks.py). A new method is one module registering a :class:`PruningMethod`, imported here.

Importing the package (the registry and its members) imports no torch: the workflow reads the
methods' names, criteria and settings keys while it builds the DAG. The structural pruning is
``igsm.pruning.structural``.
"""

from igsm.pruning import diff_pruning, gradient_flow  # noqa: F401  (each registers its method)
from igsm.pruning.diff_pruning import CRITERIA, criterion_importance, prune  # noqa: F401
from igsm.pruning.methods import METHODS, PruningMethod, criteria, method_for, register, report_pictures  # noqa: F401
