"""The paper, as data: its tables' layout and every published number the project uses
(``tables.yaml``: FIDs, params/MACs, speed-ups, the pruning-ratio labels), read by ``tables.py``
for the paper tables, the per-experiment tables' paper column and the pruned models' ratio labels.
The one place a published number lives (issue 30)."""
