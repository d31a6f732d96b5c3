"""Block reuse (igsm.reuse, DiP-GO) on tiny CPU networks.

* The blocks' consumers agree with the tensors that actually flow in a traced forward.
* MAC counts: blocks + rest = the whole network; a U-ViT counted by hand.
* An all-recompute plan reproduces the samplers bitwise, chunked or not; reused blocks are not
  executed; reusing every block returns the previous ε exactly; chunked sampling with repeated
  timesteps keeps image k independent of its batch.
* The cascade rule on both topologies; a plan's executed MACs are its cascade's, as measured when it
  runs; post-processing and the baselines meet their MAC targets.
* The SuperNet chain with every gate at "keep" is the dense sampler; the pruner starts at "keep";
  a short learn_plan gives a valid plan; plans survive save/load, and a bad file is named.
"""

import json

import numpy as np
import pytest
import torch

from igsm import reuse, reuse_methods
from igsm.diffusion import NoiseSchedule
from igsm.models import build_unet
from igsm.sampling import (Denoiser, ImageGenerators, ddim_sample, euler_maruyama_sample, generate,
                           run_sampler)
from igsm.uvit import UViT

from conftest import TINY_GRAY_UNET as TINY_UNET

# Three levels, two resnets per block: down blocks feed several up blocks.
DEEPER_UNET = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=[8, 8, 16], layers_per_block=2,
                   down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
                   up_block_types=["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"], norm_num_groups=4,
                   attention_head_dim=None)
TINY_UVIT = dict(img_size=8, patch_size=2, in_chans=1, embed_dim=16, depth=4, num_heads=2, mlp_ratio=4.0)
SHAPE = (1, 8, 8)
SCHEDULE = NoiseSchedule.linear()
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return build_unet(TINY_UNET).eval()


@pytest.fixture(scope="module")
def uvit():
    torch.manual_seed(0)
    return UViT(**TINY_UVIT).eval()


def plan_for(net, recompute, timesteps, method="dipgo"):
    graph = reuse.block_graph(net)
    return reuse.ReusePlan(recompute, graph.names, graph.consumers, timesteps, reuse.block_macs(net, SHAPE), method)


def random_plan(net, timesteps, seed, p_reuse=0.5):
    graph = reuse.block_graph(net)
    rng = np.random.default_rng(seed)
    recompute = torch.from_numpy(rng.random((len(timesteps), len(graph.names))) > p_reuse)
    recompute[0] = True
    return plan_for(net, recompute, timesteps)


class CallLog:
    """Which blocks ran at which network call, from forward pre-hooks on the original modules."""

    def __init__(self, net, names):
        self.calls, self.runs = 0, []
        self.handles = [net.register_forward_pre_hook(self._count_call)]
        for name in names:
            self.handles.append(net.get_submodule(name).register_forward_pre_hook(
                lambda module, args, name=name: self.runs.append((self.calls - 1, name))))

    def _count_call(self, module, args):
        self.calls += 1

    def remove(self):
        for handle in self.handles:
            handle.remove()


# ---------------------------------------------------------------------------------------------
# Blocks, consumers, MACs
# ---------------------------------------------------------------------------------------------

def leaves(value):
    if torch.is_tensor(value):
        return [value]
    return [x for part in value for x in leaves(part)] if isinstance(value, (tuple, list)) else []


def traced_unet_consumers(net):
    """Consumers seen in a forward: which block's output tensors each block receives."""
    produced, consumers = {}, {}
    graph = reuse.block_graph(net)
    handles = []
    for name in graph.names:
        module = net.get_submodule(name)

        def record_output(module, args, kwargs, out, name=name):
            for tensor in leaves(out):
                produced[id(tensor)] = name

        def record_input(module, args, kwargs, name=name):
            for tensor in leaves((*args, *kwargs.values())):
                if id(tensor) in produced:
                    consumers.setdefault(produced[id(tensor)], set()).add(name)

        handles.append(module.register_forward_hook(record_output, with_kwargs=True))
        handles.append(module.register_forward_pre_hook(record_input, with_kwargs=True))
    with torch.no_grad():
        out = net(torch.randn(1, *SHAPE), torch.tensor([10])).sample
    for handle in handles:
        handle.remove()
    # The last block's output goes to the head (conv_norm_out): the rest.
    consumers.setdefault(graph.names[-1], set()).add(reuse.REST)
    return {name: set(readers) for name, readers in consumers.items()}, id(out)


@pytest.mark.parametrize("architecture", [TINY_UNET, DEEPER_UNET], ids=["tiny", "deeper"])
def test_unet_consumers_are_the_blocks_that_read_each_output(architecture):
    torch.manual_seed(0)
    net = build_unet(architecture).eval()
    graph = reuse.block_graph(net)
    traced, _ = traced_unet_consumers(net)
    assert {name: set(readers) for name, readers in graph.consumers.items()} == traced
    if architecture is TINY_UNET:  # worked out by hand from UNet2DModel.forward
        assert graph.consumers == {"down_blocks.0": ("down_blocks.1", "up_blocks.0", "up_blocks.1"),
                                   "down_blocks.1": ("mid_block", "up_blocks.0"), "mid_block": ("up_blocks.0",),
                                   "up_blocks.0": ("up_blocks.1",), "up_blocks.1": (reuse.REST,)}


def test_uvit_consumers_follow_the_long_skips(uvit):
    graph = reuse.block_graph(uvit)
    assert graph.names == ("in_blocks.0", "in_blocks.1", "mid_block", "out_blocks.0", "out_blocks.1")
    assert graph.consumers == {"in_blocks.0": ("in_blocks.1", "out_blocks.1"),
                               "in_blocks.1": ("mid_block", "out_blocks.0"), "mid_block": ("out_blocks.0",),
                               "out_blocks.0": ("out_blocks.1",), "out_blocks.1": (reuse.REST,)}


def test_block_macs_add_up_to_the_whole_network(unet):
    macs = reuse.block_macs(unet, SHAPE)
    counter = torch.utils.flop_counter.FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: reuse._cpu_sdpa_flop})
    with counter, torch.no_grad():
        unet(torch.randn(3, *SHAPE), torch.tensor([7, 7, 7]))
    whole = counter.get_total_flops() / 2 / 3  # per image
    assert sum(macs.values()) == pytest.approx(whole, rel=1e-6)
    assert all(macs[name] > 0 for name in reuse.block_graph(unet).names)
    assert 0 < macs[reuse.REST] < 0.05 * whole  # conv_in, time embedding, conv_out


def test_block_macs_of_a_uvit_by_hand(uvit):
    macs = reuse.block_macs(uvit, SHAPE)
    tokens, dim = 1 + (8 // 2) ** 2, 16
    attention = 2 * tokens * tokens * dim  # QKᵀ and AV, all heads
    in_block = tokens * dim * 3 * dim + tokens * dim * dim + 2 * tokens * dim * 4 * dim + attention
    out_block = in_block + tokens * 2 * dim * dim  # skip_linear
    rest = 16 * dim * 4 + tokens * dim * 4 + 8 * 8 * 9  # patch embed, decoder, final 3×3 conv
    assert macs == {"in_blocks.0": in_block, "in_blocks.1": in_block, "mid_block": in_block,
                    "out_blocks.0": out_block, "out_blocks.1": out_block, reuse.REST: rest}


# ---------------------------------------------------------------------------------------------
# Applying plans in the samplers
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("micro_batch", [None, 2])
def test_all_recompute_plan_reproduces_ddim_bitwise(unet, micro_batch):
    num_steps = 6
    timesteps = reuse.sampler_timesteps("ddim", num_steps)
    plan = plan_for(unet, torch.ones(num_steps, 5, dtype=torch.bool), timesteps, "dense")
    kwargs = dict(sampler="ddim", num_steps=num_steps, eta=0.5, seeds=np.arange(5), image_shape=SHAPE)
    dense = generate(Denoiser(unet, micro_batch=micro_batch), **kwargs)
    with reuse.apply_plan(unet, plan):
        planned = generate(Denoiser(unet, micro_batch=micro_batch), **kwargs)
    assert torch.equal(planned, dense)


def test_all_recompute_plan_reproduces_euler_maruyama_bitwise_on_a_uvit(uvit):
    num_steps = 5
    plan = plan_for(uvit, torch.ones(num_steps, 5, dtype=torch.bool),
                    reuse.sampler_timesteps("euler-maruyama", num_steps), "dense")
    for micro_batch in (None, 2):
        kwargs = dict(sampler="euler-maruyama", num_steps=num_steps, seeds=np.arange(3), image_shape=SHAPE)
        dense = generate(Denoiser(uvit, micro_batch=micro_batch), **kwargs)
        with reuse.apply_plan(uvit, plan):
            assert torch.equal(generate(Denoiser(uvit, micro_batch=micro_batch), **kwargs), dense)
    # A plan that reuses changes the images (the plan is applied at all) but keeps them finite.
    deepcache = reuse.deepcache_plan(reuse.block_graph(uvit), plan.macs, plan.timesteps, interval=2)
    with reuse.apply_plan(uvit, deepcache):
        cached = generate(uvit, **kwargs)
    assert torch.isfinite(cached).all() and not torch.equal(cached, dense)


@pytest.mark.parametrize("family", ["unet", "uvit"])
def test_reused_blocks_are_not_executed(unet, uvit, family):
    net = unet if family == "unet" else uvit
    num_steps = 8
    plan = random_plan(net, reuse.sampler_timesteps("ddim", num_steps), seed=3)
    log = CallLog(net, plan.blocks)
    with reuse.apply_plan(net, plan) as applied:
        ddim_sample(net, torch.randn(2, *SHAPE), SCHEDULE, num_steps=num_steps)
    log.remove()
    assert log.calls == num_steps
    ran = torch.zeros(num_steps, len(plan.blocks), dtype=torch.bool)
    for call, name in log.runs:
        ran[call, plan.blocks.index(name)] = True
    assert len(log.runs) == int(ran.sum())  # each block at most once per call
    assert torch.equal(ran, applied.recompute) and torch.equal(applied.recompute, plan.cascaded().recompute)
    assert not ran.all()  # the random plan does reuse
    # Outside the context the network is itself again.
    assert type(net.get_submodule(plan.blocks[0])).__name__ != "_CachedBlock"


def test_reusing_every_block_returns_the_previous_noise_prediction(unet):
    timesteps = reuse.sampler_timesteps("ddim", 5)
    graph = reuse.block_graph(unet)
    plan = reuse.reuse_eps_plan(graph, reuse.block_macs(unet, SHAPE), timesteps, skipped_steps=[2, 3])
    eps = []
    with reuse.apply_plan(unet, plan), torch.no_grad():
        for t in timesteps:  # a new x at every step: only the cache can make ε repeat
            eps.append(unet(torch.randn(2, *SHAPE), torch.full((2,), t)).sample)
    assert torch.equal(eps[2], eps[1]) and torch.equal(eps[3], eps[1])
    assert not torch.equal(eps[1], eps[0]) and not torch.equal(eps[4], eps[1])


def test_chunks_and_repeated_timesteps_keep_image_k_independent_of_its_batch(unet):
    # DDIM "quad" at 40 steps visits t = 0 twice: chunked calls must not be mistaken for steps.
    num_steps = 40
    timesteps = reuse.sampler_timesteps("ddim", num_steps, spacing="quad")
    assert timesteps[-2:] == [0, 0]
    plan = random_plan(unet, timesteps, seed=5, p_reuse=0.6)
    kwargs = dict(sampler="ddim", num_steps=num_steps, spacing="quad", image_shape=SHAPE)
    net = Denoiser(unet, micro_batch=2)
    log = CallLog(unet, plan.blocks)
    with reuse.apply_plan(unet, plan) as applied:
        whole = generate(net, seeds=np.arange(5), **kwargs)  # 3 chunks per step
        parts = torch.cat([generate(net, seeds=np.arange(i, min(i + 2, 5)), **kwargs) for i in (0, 2, 4)])
    log.remove()
    assert torch.equal(parts, whole)
    # Runs per block: (3 chunks + 1 + 1 + 1) × the steps at which it recomputes.
    runs_per_block = applied.recompute.sum(0) * 6
    counted = torch.tensor([sum(1 for _, name in log.runs if name == block) for block in plan.blocks])
    assert torch.equal(counted, runs_per_block)
    with torch.no_grad():
        dense = generate(net, seeds=np.arange(5), **kwargs)
    assert not torch.equal(whole, dense)


def test_a_timestep_outside_the_plan_is_an_error(unet):
    plan = plan_for(unet, torch.ones(4, 5, dtype=torch.bool), reuse.sampler_timesteps("ddim", 4))
    with reuse.apply_plan(unet, plan), pytest.raises(ValueError, match="not a timestep of the plan"):
        ddim_sample(unet, torch.randn(1, *SHAPE), SCHEDULE, num_steps=5)  # t = 800: the plan has 750
    with reuse.apply_plan(unet, plan), pytest.raises(ValueError, match="must start at the plan's step 0"):
        unet(torch.randn(1, *SHAPE), torch.tensor([500]))
    with pytest.raises(ValueError, match="not the network's"):
        with reuse.apply_plan(build_unet(DEEPER_UNET), plan):
            pass


# ---------------------------------------------------------------------------------------------
# Cascade, post-processing, baselines
# ---------------------------------------------------------------------------------------------

def test_cascade_on_the_unet_topology(unet):
    names = reuse.block_graph(unet).names
    recompute = torch.ones(3, len(names), dtype=torch.bool)
    recompute[1, names.index("up_blocks.0")] = recompute[1, names.index("up_blocks.1")] = False
    recompute[2, [names.index("up_blocks.0"), names.index("mid_block")]] = False
    cascaded = plan_for(unet, recompute, [900, 500, 100]).cascaded().recompute
    assert not cascaded[1].any()  # all up blocks reuse: nothing below them is read
    # Step 2: the last up block still runs and reads down_blocks.0's skip; down_blocks.1 is read
    # only by the mid block and up_blocks.0, both reused.
    assert dict(zip(names, cascaded[2].tolist())) == {"down_blocks.0": True, "down_blocks.1": False,
                                                      "mid_block": False, "up_blocks.0": False,
                                                      "up_blocks.1": True}
    assert cascaded[0].all()


def test_cascade_on_the_uvit_topology_reaches_a_fixed_point(uvit):
    names = reuse.block_graph(uvit).names
    recompute = torch.ones(3, len(names), dtype=torch.bool)
    recompute[1, names.index("out_blocks.0")] = recompute[1, names.index("out_blocks.1")] = False
    recompute[2, names.index("out_blocks.0")] = False
    cascaded = plan_for(uvit, recompute, [900, 500, 100]).cascaded().recompute
    assert not cascaded[1].any()  # out → mid → in_blocks.1 → in_blocks.0, through the skips
    # out_blocks.1 runs at step 2 and reads in_blocks.0's skip; in_blocks.1 feeds only reused blocks.
    assert cascaded[2].tolist() == [True, False, False, False, True]
    # The last block is never cascaded away, whatever the others do.
    only_last = torch.ones(2, len(names), dtype=torch.bool)
    only_last[1, :-1] = False
    assert plan_for(uvit, only_last, [900, 100]).cascaded().recompute[1].tolist() == [False] * 4 + [True]


@pytest.mark.parametrize("family", ["unet", "uvit"])
def test_executed_macs_are_what_the_plan_runs_after_the_cascade(unet, uvit, family):
    """A plan's executed MACs (and its mac_fraction) are those of its cascade, which is what
    apply_plan runs: measured here by FlopCounterMode on each sampling step of a plan the cascade
    changes, one image per call as block_macs counts. Catches MACs counted on the plan's own gates
    (harmless for the cascaded plans the package returns, wrong for the raw hard gates DiP-GO's
    learning measures to stop its sparsity term, and for any plan read from a file)."""
    from igsm.models import predict_noise

    net = unet if family == "unet" else uvit
    timesteps = reuse.sampler_timesteps("ddim", 8)
    plan = random_plan(net, timesteps, seed=3)
    cascaded = plan.cascaded()
    assert not torch.equal(plan.recompute, cascaded.recompute)  # the cascade matters for this plan
    measured = []
    with reuse.apply_plan(net, plan), torch.no_grad():
        for t in timesteps:
            counter = torch.utils.flop_counter.FlopCounterMode(display=False, custom_mapping={
                torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: reuse._cpu_sdpa_flop})
            with counter:
                predict_noise(net, torch.randn(1, *SHAPE), torch.tensor([t]))
            measured.append(counter.get_total_flops() / 2)
    measured = torch.tensor(measured, dtype=torch.float64)
    assert plan.executed_macs().tolist() == pytest.approx(measured.tolist(), rel=1e-9)
    assert torch.equal(plan.executed_macs(), cascaded.executed_macs())
    assert plan.mac_fraction() == cascaded.mac_fraction() == pytest.approx(
        float(measured.mean()) / plan.dense_macs(), rel=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_post_processing_meets_its_mac_target(unet, seed):
    graph, macs = reuse.block_graph(unet), reuse.block_macs(unet, SHAPE)
    timesteps = reuse.sampler_timesteps("ddim", 10)
    scores = torch.rand(10, len(graph.names), generator=torch.Generator().manual_seed(seed))
    smallest = reuse.smallest_mac_fraction(macs, 10)
    for target in (0.9, 0.6, 0.35, smallest):
        plan = reuse.plan_from_scores(scores, graph, macs, timesteps, target)
        assert plan.recompute[0].all()
        assert plan.mac_fraction() <= target + 1e-12, (target, plan.mac_fraction())
        # Not far below: the last entry set (with what it cascades) is at most one step's blocks.
        one_step = (1 - macs[reuse.REST] / sum(macs.values())) / 10
        assert plan.mac_fraction() > target - one_step - 1e-12
        assert torch.equal(plan.recompute, plan.cascaded().recompute)
    with pytest.raises(ValueError, match=f"smallest reachable executed share is {smallest:.6f}"):
        reuse.plan_from_scores(scores, graph, macs, timesteps, smallest * 0.99)


def test_post_processing_goes_by_threshold_then_from_the_output_side(unet):
    graph, macs = reuse.block_graph(unet), reuse.block_macs(unet, SHAPE)
    timesteps = reuse.sampler_timesteps("ddim", 6)
    dense = sum(macs.values())
    # Reusing up_blocks.0 at a step also cascades mid_block and down_blocks.1 away.
    saved_by_up0 = macs["up_blocks.0"] + macs["mid_block"] + macs["down_blocks.1"]
    scores = torch.full((6, 5), 0.5)
    scores[:, 0], scores[:, 3] = 0.99, 0.97  # same round: the output side (up_blocks.0) first
    plan = reuse.plan_from_scores(scores, graph, macs, timesteps, 1 - 1.5 * saved_by_up0 / (6 * dense))
    assert plan.recompute[:, 3].tolist() == [True, False, False, True, True, True]
    assert plan.recompute[:, 0].all()
    scores[:, 3] = 0.93  # a later round: down_blocks.0's higher scores go first
    target = 1 - (5 * macs["down_blocks.0"] + 1.5 * saved_by_up0) / (6 * dense)
    plan = reuse.plan_from_scores(scores, graph, macs, timesteps, target)
    assert plan.recompute[:, 0].tolist() == [True] + [False] * 5
    assert plan.recompute[:, 3].tolist() == [True, False, False, True, True, True]


def test_baselines_meet_their_mac_fraction(unet):
    graph, macs = reuse.block_graph(unet), reuse.block_macs(unet, SHAPE)
    timesteps = reuse.sampler_timesteps("ddim", 12)
    cache = reuse.deepcache_plan(graph, macs, timesteps, mac_fraction=0.5)
    k = cache.metadata["interval"]
    assert cache.mac_fraction() <= 0.5 < reuse.deepcache_plan(graph, macs, timesteps, k - 1).mac_fraction()
    assert cache.recompute[::k].all() and cache.recompute[1, [0, 4]].all() and not cache.recompute[1, 1:4].any()
    eps = reuse.reuse_eps_plan(graph, macs, timesteps, mac_fraction=0.5)
    skipped = eps.metadata["skipped_steps"]
    assert eps.mac_fraction() <= 0.5 and eps.recompute[0].all()
    # The fewest: 6 skipped steps would leave the rest's MACs above one half.
    assert len(skipped) == 7 and reuse.reuse_eps_plan(graph, macs, timesteps, skipped[:-1]).mac_fraction() > 0.5
    run = [s for s in range(12) if s not in skipped]
    assert run == [0, 2, 4, 7, 9] and eps.recompute[run].all() and not eps.recompute[skipped].any()
    assert reuse_methods.METHODS["fewer-steps"].sampler_steps(100, 0.25) == 25
    with pytest.raises(ValueError, match="out of reach"):
        reuse.reuse_eps_plan(graph, macs, timesteps, mac_fraction=0.05)


def test_registry_plans_are_the_rules_at_the_sample_settings(unet):
    """reuse_methods.make_plan (the `reuse-plan` command) gives each rule's own plan for the sampler
    of the 'sample' settings, its target recorded; a method without a gate table says so."""
    options = {"sampler": "ddim", "num_steps": 12, "spacing": "uniform"}
    graph, macs = reuse.block_graph(unet), reuse.block_macs(unet, SHAPE)
    timesteps = reuse.sampler_timesteps("ddim", 12, schedule=SCHEDULE)
    for name, rule in (("deepcache", reuse.deepcache_plan), ("reuse-eps", reuse.reuse_eps_plan)):
        plan = reuse_methods.make_plan(unet, name, 0.5, options, SCHEDULE, {})
        assert plan.digest() == rule(graph, macs, timesteps, mac_fraction=0.5).digest() and plan.method == name
        assert plan.metadata["target_mac_fraction"] == 0.5 and plan.metadata["num_steps"] == 12
    with pytest.raises(ValueError, match="'fewer-steps' makes no gate table: it samples with fewer sampler steps"):
        reuse_methods.make_plan(unet, "fewer-steps", 0.5, options, SCHEDULE, {})
    with pytest.raises(ValueError, match="--method: unknown reuse method 'cache-all'; choose one of dipgo, "):
        reuse_methods.make_plan(unet, "cache-all", 0.5, options, SCHEDULE, {})


# ---------------------------------------------------------------------------------------------
# SuperNet, pruner, learning, files
# ---------------------------------------------------------------------------------------------

def keep_gates(num_steps, num_blocks):
    gates = torch.zeros(num_steps, num_blocks, 2)
    gates[..., reuse.KEEP] = 1
    return gates.requires_grad_()


@pytest.mark.parametrize("family", ["unet", "uvit"])
@pytest.mark.parametrize("sampler", ["ddim", "euler-maruyama"])
def test_supernet_with_every_gate_kept_is_the_dense_sampler(unet, uvit, family, sampler):
    """DiP-GO's differentiable chain runs the samplers' own step objects: with every gate at "keep"
    its x_0 is the plain loop's, bitwise (a second copy of an update, or another dtype of the
    network input or of the step noise, would differ in the last bits)."""
    net = unet if family == "unet" else uvit
    num_steps, seeds = 5, np.arange(3)
    chain = reuse._make_chain(sampler, num_steps, None, eta=0.7)
    generators = ImageGenerators(seeds)
    noise = generators.randn(SHAPE)
    dense = run_sampler(chain, net, noise, generators)
    generators = ImageGenerators(seeds)
    generators.randn(SHAPE)
    step_noises = [generators.randn(SHAPE, dtype=torch.float64) if chain.draws_noise(s) else None
                   for s in range(num_steps)]
    gates = keep_gates(num_steps, 5)
    images = reuse._supernet_sample(net, reuse.block_graph(net), chain, noise, gates, step_noises)
    assert torch.equal(images, dense)
    # The gradient reaches the gates of every step but the first, through the checkpoints.
    images.square().sum().backward()
    assert gates.grad[0].abs().sum() == 0 and (gates.grad[1:, :, reuse.REUSE].abs().sum(1) > 0).all()
    with torch.no_grad():  # and reference check of the sampler functions themselves
        reference = (ddim_sample(net, noise, SCHEDULE, num_steps=num_steps, eta=0.7,
                                 generators=_regenerated(seeds)) if sampler == "ddim"
                     else euler_maruyama_sample(net, noise, num_steps=num_steps, generators=_regenerated(seeds)))
    assert torch.equal(reference, dense)


def _regenerated(seeds):
    generators = ImageGenerators(seeds)
    generators.randn(SHAPE)
    return generators


def test_pruner_starts_at_recompute_and_its_gates_are_straight_through():
    torch.manual_seed(0)
    pruner = reuse.ReusePruner(num_steps=7, num_blocks=5, dim=16, num_heads=2)
    gates = pruner()
    assert torch.equal(gates.detach()[..., reuse.KEEP], torch.ones(7, 5))
    assert (pruner.scores() < 0.5).all()
    (gates[..., reuse.REUSE] * torch.arange(1.0, 36.0).view(7, 5)).sum().backward()
    assert (pruner.out_bias.grad[..., reuse.REUSE] > 0).all()  # softmax gradient through hard gates


def test_pruner_gates_have_their_own_parameters():
    """A loss on one gate moves only that gate's logits at first (the heads' last layer starts at
    zero, so nothing reaches the shared encoder): a shared output bias once moved every gate together."""
    torch.manual_seed(0)
    pruner = reuse.ReusePruner(num_steps=6, num_blocks=4, dim=16, num_heads=2)
    before = pruner.logits().detach()
    optimizer = torch.optim.SGD(pruner.parameters(), lr=1.0)
    pruner()[3, 2, reuse.KEEP].backward()  # lower the keep gate of one position
    optimizer.step()
    moved = (pruner.logits().detach() - before).abs().sum(-1)
    assert moved[3, 2] > 0.1
    moved[3, 2] = 0
    assert moved.max() == 0


def test_ssim_is_one_for_equal_images_and_less_otherwise():
    a = torch.rand(2, 1, 8, 8) * 2 - 1
    torch.testing.assert_close(reuse.ssim(a, a), torch.ones(2))
    b = a + 0.3 * torch.randn_like(a)
    assert (reuse.ssim(a, b) < 0.99).all()
    torch.testing.assert_close(reuse.ssim(a, b), reuse.ssim(b, a))


def test_learn_plan_returns_a_valid_plan(unet):
    target = 0.7
    plan = reuse.learn_plan(unet, sampler="ddim", num_steps=4, image_shape=SHAPE, mac_fraction=target,
                            train_steps=3, batch_size=2, query_dim=16, num_heads=2, progress=False)
    assert plan.method == "dipgo" and plan.recompute.shape == (4, 5) and plan.recompute[0].all()
    assert plan.mac_fraction() <= target
    assert plan.timesteps == tuple(reuse.sampler_timesteps("ddim", 4))
    assert len(plan.metadata["history"]) == 3 and np.isfinite([h["loss"] for h in plan.metadata["history"]]).all()
    assert np.array(plan.metadata["scores"]).shape == (4, 5)
    assert all(p.requires_grad for p in unet.parameters())  # the network is left as it was
    with pytest.raises(ValueError, match="smallest reachable"):
        reuse.learn_plan(unet, num_steps=4, image_shape=SHAPE, mac_fraction=0.01, train_steps=1, progress=False)


def test_learn_plan_with_euler_maruyama_on_a_uvit(uvit):
    plan = reuse.learn_plan(uvit, sampler="euler-maruyama", num_steps=4, image_shape=SHAPE, mac_fraction=0.8,
                            train_steps=2, batch_size=2, query_dim=16, num_heads=2, progress=False)
    assert plan.recompute[0].all() and plan.mac_fraction() <= 0.8
    assert plan.timesteps == tuple(reuse.sampler_timesteps("euler-maruyama", 4))
    with reuse.apply_plan(uvit, plan):  # the learnt plan runs in the sampler it was learnt for
        images = generate(uvit, sampler="euler-maruyama", num_steps=4, seeds=np.arange(2), image_shape=SHAPE)
    assert torch.isfinite(images).all()


def test_plan_save_load_round_trip_and_errors_name_the_file(unet, tmp_path):
    plan = random_plan(unet, reuse.sampler_timesteps("ddim", 6), seed=1)
    plan.metadata = {"note": "test"}
    path = tmp_path / "plan.json"
    plan.save(path)
    document = json.loads(path.read_text())
    assert document["recompute"][0] == "11111" and set("".join(document["recompute"])) <= {"0", "1"}
    back = reuse.ReusePlan.load(path, graph=reuse.block_graph(unet), timesteps=plan.timesteps)
    assert torch.equal(back.recompute, plan.recompute) and back.blocks == plan.blocks
    assert back.macs == plan.macs and back.timesteps == plan.timesteps and back.metadata == plan.metadata
    assert back.mac_fraction() == plan.mac_fraction()
    assert not list(tmp_path.glob("*.tmp"))

    document["recompute"][2] = "101"
    (tmp_path / "short.json").write_text(json.dumps(document))
    with pytest.raises(ValueError, match="short.json.*row 2"):
        reuse.ReusePlan.load(tmp_path / "short.json")
    document["recompute"][2] = "11111"
    document["recompute"][0] = "01111"
    (tmp_path / "step0.json").write_text(json.dumps(document))
    with pytest.raises(ValueError, match="step0.json.*step 0"):
        reuse.ReusePlan.load(tmp_path / "step0.json")
    with pytest.raises(ValueError, match="plan.json.*another architecture"):
        reuse.ReusePlan.load(path, graph=reuse.block_graph(build_unet(DEEPER_UNET)))
    with pytest.raises(ValueError, match="plan.json.*the sampler visits 7"):
        reuse.ReusePlan.load(path, timesteps=reuse.sampler_timesteps("ddim", 7))
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="broken.json"):
        reuse.ReusePlan.load(tmp_path / "broken.json")


# ---------------------------------------------------------------------------------------------
# Conditional networks with classifier-free guidance (issue 31: DiT, SD's U-Net)
# ---------------------------------------------------------------------------------------------

TEXT_WIDTH = 32
TINY_DIT = dict(family="dit", sample_size=8, in_channels=1, patch_size=2, num_attention_heads=2, attention_head_dim=8,
                num_layers=3, num_embeds_ada_norm=3, norm_num_groups=1)
TINY_SD = dict(family="sd-unet", sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
               layers_per_block=1, norm_num_groups=4, attention_head_dim=4, cross_attention_dim=TEXT_WIDTH,
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
PROMPTS = ["a photo of a trouser", "a photo of an ankle boot", "a sandal"]


@pytest.fixture(scope="module")
def conditional(tmp_path_factory):
    """{"dit": (class-conditional DiT, its class kind), "sd": (SD U-Net, a text kind)}, random weights
    (the DiT's adaLN-Zero layers too, so that every block changes its input)."""
    from igsm.conditioning import ClassLabels, TextPrompts, save_tiny_text_encoder
    from igsm.families import family_named

    torch.manual_seed(0)
    dit = family_named("dit").build(TINY_DIT).eval()
    with torch.no_grad():
        for name, param in dit.named_parameters():
            if "norm1.linear" in name or "proj_out" in name:
                param.normal_(0, 0.3)
    sd = family_named("sd-unet").build(TINY_SD).eval()
    encoder = save_tiny_text_encoder(tmp_path_factory.mktemp("clip"), PROMPTS, hidden_size=TEXT_WIDTH, max_length=8)
    return {"dit": (dit, ClassLabels(3)), "sd": (sd, TextPrompts(str(encoder), PROMPTS))}


@pytest.mark.parametrize("family", ["dit", "sd"])
def test_block_macs_of_a_conditional_network_are_counted_under_its_condition(conditional, family):
    """Blocks + rest = one forward under the family's example condition (SD: a text embedding of
    CLIP's 77 tokens, whose keys and values every cross-attention computes; a count under a shorter
    or no condition would miss them)."""
    net, _ = conditional[family]
    macs = reuse.block_macs(net, SHAPE)
    counter = torch.utils.flop_counter.FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: reuse._cpu_sdpa_flop})
    condition = ({"class_labels": torch.tensor([0, 1])} if family == "dit"
                 else {"encoder_hidden_states": torch.randn(2, 77, TEXT_WIDTH)})
    with counter, torch.no_grad():
        net(torch.randn(2, *SHAPE), torch.tensor([7, 7]), **condition)
    assert sum(macs.values()) == pytest.approx(counter.get_total_flops() / 2 / 2, rel=1e-6)
    assert all(macs[name] > 0 for name in reuse.block_graph(net).names)


def guided_denoiser(conditional, family, micro_batch=None, scale=3.0):
    net, kind = conditional[family]
    return Denoiser(net, micro_batch=micro_batch, guidance_scale=scale, conditioning=kind)


@pytest.mark.parametrize("family", ["dit", "sd"])
@pytest.mark.parametrize("micro_batch", [None, 2])
def test_all_recompute_plan_reproduces_guided_ddim_bitwise(conditional, family, micro_batch):
    net, kind = conditional[family]
    num_steps = 5
    plan = plan_for(net, torch.ones(num_steps, len(reuse.block_graph(net).names), dtype=torch.bool),
                    reuse.sampler_timesteps("ddim", num_steps), "dense")
    kwargs = dict(sampler="ddim", num_steps=num_steps, seeds=np.arange(3), image_shape=SHAPE, conditioning=kind)
    dense = generate(guided_denoiser(conditional, family, micro_batch), **kwargs)
    with reuse.apply_plan(net, plan):
        assert torch.equal(generate(guided_denoiser(conditional, family, micro_batch), **kwargs), dense)
    # and a plan that reuses changes the guided images (it is applied) but keeps them finite
    deepcache = reuse.deepcache_plan(reuse.block_graph(net), plan.macs, plan.timesteps, interval=2)
    with reuse.apply_plan(net, deepcache):
        cached = generate(guided_denoiser(conditional, family, micro_batch), **kwargs)
    assert torch.isfinite(cached).all() and not torch.equal(cached, dense)


def test_guided_reuse_keeps_the_conditional_and_null_passes_apart(conditional):
    """Reusing every block at a step returns the previous step's *guided* ε exactly: the null pass
    reads its own cached features, not the conditional pass's (one cache for both would give
    ε̂_c at the reused step, the guidance gone). On SD's U-Net, whose head after the last block
    does not read t (DiT's final adaLN layer does: its ε changes with t even then)."""
    family = "sd"
    net, kind = conditional[family]
    timesteps = reuse.sampler_timesteps("ddim", 5)
    graph = reuse.block_graph(net)
    plan = reuse.reuse_eps_plan(graph, reuse.block_macs(net, SHAPE), timesteps, skipped_steps=[2])
    denoiser, condition = guided_denoiser(conditional, family), kind.sampling_condition(np.arange(2))
    eps = []
    with reuse.apply_plan(net, plan):
        for t in timesteps:  # a new x at every step: only the caches can make ε repeat
            eps.append(denoiser(torch.randn(2, *SHAPE), torch.full((2,), t), condition))
    assert torch.equal(eps[2], eps[1]) and not torch.equal(eps[3], eps[1])
    with torch.no_grad():
        unguided = net(torch.randn(2, *SHAPE), torch.full((2,), timesteps[1]),
                       **{denoiser.keyword: condition}).sample
    assert not torch.allclose(eps[1], unguided, atol=1e-3)


@pytest.mark.parametrize("family", ["dit", "sd"])
def test_supernet_with_every_gate_kept_is_the_guided_sampler(conditional, family):
    """DiP-GO's chain of a conditional network: each seed's condition for both the dense chain and
    the SuperNet's, guided alike (the SuperNet runs the conditional and null halves as one batch,
    so equal up to rounding); against the chain without guidance the images clearly differ (a
    guidance on the wrong half, or a dropped condition, would not match)."""
    net, kind = conditional[family]
    num_steps, seeds = 4, range(3)
    chain = reuse._make_chain("ddim", num_steps, None, eta=0.5)
    noise, dense, step_noises, condition = reuse._dense_images_and_draws(
        chain, net, seeds, SHAPE, num_steps, torch.device("cpu"), kind, guidance_scale=3.0)
    assert condition.scale == 3.0 and torch.equal(condition.null, kind.null_like(condition.condition))
    gates = keep_gates(num_steps, len(reuse.block_graph(net).names))
    images = reuse._supernet_sample(net, reuse.block_graph(net), chain, noise, gates, step_noises, condition=condition)
    torch.testing.assert_close(images, dense, rtol=1e-4, atol=1e-4)  # guidance ×3 scales the rounding too
    unguided = reuse._dense_images_and_draws(chain, net, seeds, SHAPE, num_steps, torch.device("cpu"), kind)[1]
    assert (images - unguided).abs().max() > 1e-2
    images.square().sum().backward()
    assert (gates.grad[1:, :, reuse.REUSE].abs().sum(1) > 0).all()


def test_dipgo_learns_a_guided_plan_from_the_sample_settings(conditional):
    """The registry's DiP-GO (the `reuse-plan` stage) reads the conditioning and guidance of the
    'sample' settings, and for a latent experiment compares latents; the plan it learns runs in
    the guided sampler."""
    net, kind = conditional["dit"]
    options = {"sampler": "ddim", "num_steps": 4, "eta": 0.0, "spacing": "uniform", "clip_x0": False,
               "guidance_scale": 2.0, "conditioning": {"kind": "class", "num_classes": 3, "drop_prob": 0.1},
               "latents": {"autoencoder": "results/autoencoders/vae/model", "image_channels": 1}}
    learn = dict(train_steps=2, batch_size=2, query_dim=16, num_heads=2, progress=False)
    plan = reuse_methods.make_plan(net, "dipgo", 0.7, options, SCHEDULE, learn)
    assert plan.recompute[0].all() and plan.mac_fraction() <= 0.7
    settings = plan.metadata["settings"]
    assert settings["guidance_scale"] == 2.0 and settings["conditioning"]["kind"] == "class"
    assert settings["latents"] is True and np.isfinite([h["loss"] for h in plan.metadata["history"]]).all()
    with pytest.raises(ValueError, match="no condition for a conditional DiTTransformer2DModel"):
        reuse.learn_plan(net, num_steps=4, image_shape=SHAPE, mac_fraction=0.7, train_steps=1, progress=False)
    with reuse.apply_plan(net, plan):
        images = generate(guided_denoiser(conditional, "dit", scale=2.0), sampler="ddim", num_steps=4,
                          seeds=np.arange(2), image_shape=SHAPE, conditioning=kind)
    assert torch.isfinite(images).all()
