"""A toy block-reuse method, added by a plugin (config ``plugins:``; issue 30): ``periodic`` runs
the whole network every k-th sampling step and reuses every block's cached output in between, with
the smallest period k whose executed MACs meet the variant's MAC fraction. A rule, like DeepCache's,
made from the network's blocks and the sampler's steps (igsm.reuse.rule_plan_inputs).

Imports torch only when it makes a plan: the workflow reads its name while building the DAG.
"""

from __future__ import annotations

from igsm.reuse_methods import ReuseMethod, register


class Periodic(ReuseMethod):
    name = "periodic"

    def plan(self, net, mac_fraction, options, schedule, learn, device="cpu"):
        import torch

        from igsm.reuse import ReusePlan, rule_plan_inputs

        graph, macs, timesteps = rule_plan_inputs(net, options, schedule)
        for period in range(1, len(timesteps) + 1):
            recompute = torch.zeros(len(timesteps), len(graph.names), dtype=torch.bool)
            recompute[::period] = True
            plan = ReusePlan(recompute, graph.names, graph.consumers, timesteps, macs, self.name,
                             {"period": period})
            if plan.mac_fraction() <= mac_fraction + 1e-12:
                return plan
        raise ValueError(f"reuse method {self.name!r}: mac_fraction {mac_fraction} is out of reach at "
                         f"{len(timesteps)} steps (the smallest is {plan.mac_fraction():.4f})")


register(Periodic())
