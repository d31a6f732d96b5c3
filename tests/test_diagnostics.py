"""Issue 20: the Jacobian terms restricted to a timestep range, and the per-term, per-range
diagnostics the training loop logs, against direct computations (float64, tiny networks)."""

from __future__ import annotations

import json

import pytest
import torch

from igsm.objectives import build_objective, retained_subgraphs
from igsm.training import term_diagnostics, timestep_ranges
from test_objectives import fixed_directions, make_batch, tiny_unet

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

WEIGHTS = {"np": 1.0, "kd": 0.5, "jm2": 0.1}


def batch_at(times):
    """A batch of len(times) images at the given DDPM timesteps."""
    x_t, _, noise = make_batch(batch=len(times))
    return x_t, torch.tensor(times), noise


def flat_grad(loss, params):
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(params, grads)])


@pytest.mark.parametrize("method", ["double_backward", "mixed_fd"])
def test_jacobian_window_zeroes_the_terms_outside_it(method):
    """jacobian_timesteps [lo, hi): inside, the Jacobian terms and their gradient are the
    unrestricted ones; outside, zero (an off-by-one at the bounds, or a mask forgotten on the
    mixed-partial surrogate, would fail)."""
    student, teacher = tiny_unet((4, 8), seed=1), tiny_unet((8, 16), seed=2)
    x_t, t, noise = batch_at([5, 10, 99, 100])  # the window [10, 100) holds rows 1 and 2
    v = fixed_directions(x_t, 1)
    settings = dict(directions=lambda x, t_, g: v, jacobian_method=method)
    weights = {"jm2": 1.0, "jm2_rel": 0.3}
    _, full = build_objective(weights, **settings)(student, teacher, x_t, t, noise, None)
    total, windowed = build_objective(weights, jacobian_timesteps=[10, 100], **settings)(
        student, teacher, x_t, t, noise, None)
    inside = torch.tensor([False, True, True, False])
    for name in weights:
        assert torch.equal(windowed[name][~inside], torch.zeros(2, dtype=x_t.dtype)), name
        torch.testing.assert_close(windowed[name][inside], full[name][inside], rtol=1e-12, atol=0)

    params = list(student.parameters())
    grad = flat_grad(total.sum(), params)
    # Reference: the unrestricted objective on the rows inside the window alone.
    reference_total, _ = build_objective(weights, directions=lambda x, t_, g: v[:, inside])(
        student, teacher, x_t[inside], t[inside], noise[inside], None)
    reference = flat_grad(reference_total.sum(), params)
    tolerance = 1e-12 if method == "double_backward" else 1e-7  # finite differences: NOTES-level error
    assert float((grad - reference).norm() / reference.norm()) < tolerance


def test_contributions_sum_to_the_total():
    student, teacher = tiny_unet((4, 8), seed=1), tiny_unet((8, 16), seed=2)
    x_t, t, noise = batch_at([3, 50, 500])
    v = fixed_directions(x_t, 1)
    for method in ("double_backward", "mixed_fd"):
        objective = build_objective(WEIGHTS, directions=lambda x, t_, g: v, jacobian_method=method)
        total, values, parts = objective(student, teacher, x_t, t, noise, None, contributions=True)
        assert set(parts) == {"np", "kd", "jm2"}
        params = list(student.parameters())
        with retained_subgraphs():  # two backward passes through mixed_fd's surrogate
            torch.testing.assert_close(flat_grad(sum(parts.values()).sum(), params),
                                       flat_grad(total.sum(), params), rtol=1e-12, atol=0)
        torch.testing.assert_close(total.detach(), sum(WEIGHTS[n] * values[n] for n in WEIGHTS), rtol=1e-12, atol=0)


def test_logged_gradient_norms_equal_a_direct_computation():
    """Each (term, range) entry against the term evaluated on that range's rows alone, its
    λ-weighted sum over them divided by the whole batch, differentiated directly; the values
    against the rows' mean. Catches a mask applied to the wrong rows, a missing λ or 1/B, a norm
    taken before summing over processes' rows, or ranges cut at the wrong edges."""
    student, teacher = tiny_unet((4, 8), seed=1), tiny_unet((8, 16), seed=2)
    times = [3, 50, 500, 7, 10]
    x_t, t, noise = batch_at(times)
    v = fixed_directions(x_t, 1)
    objective = build_objective(WEIGHTS, directions=lambda x, t_, g: v)
    _, values, parts = objective(student, teacher, x_t, t, noise, None, contributions=True)
    params = list(student.parameters())
    record = term_diagnostics(parts, values, t, params, len(times), [10, 100])

    assert record["ranges"] == [[0.0, 10.0], [10.0, 100.0], [100.0, None]]
    assert record["rows"] == [2, 2, 1]  # t = 10 belongs to [10, 100)
    for name, weight in WEIGHTS.items():
        whole = torch.zeros_like(flat_grad(parts[name].sum(), params))
        for index, (low, high) in enumerate(timestep_ranges([10, 100])):
            rows = (t >= low) & (t < high)
            term = build_objective({name: weight}, directions=lambda x, t_, g: v[:, rows])
            total, alone = term(student, teacher, x_t[rows], t[rows], noise[rows], None)
            grad = flat_grad(total.sum() / len(times), params)
            whole += grad
            assert record[name]["grad_norm"][index] == pytest.approx(float(grad.norm()), rel=1e-10), (name, index)
            assert record[name]["value"][index] == pytest.approx(float(alone[name].mean()), rel=1e-10), (name, index)
        assert record[name]["grad_norm_all"] == pytest.approx(float(whole.norm()), rel=1e-10), name

    # Mixed partials: the Jacobian term's entry from its surrogate, one backward per range.
    mixed = build_objective(WEIGHTS, directions=lambda x, t_, g: v, jacobian_method="mixed_fd")
    _, values, parts = mixed(student, teacher, x_t, t, noise, None, contributions=True)
    approximate = term_diagnostics(parts, values, t, params, len(times), [10, 100])
    assert approximate["jm2"]["grad_norm"] == pytest.approx(record["jm2"]["grad_norm"], rel=1e-6)


def test_an_empty_range_has_no_value_and_zero_gradient():
    student, teacher = tiny_unet((4, 8), seed=1), tiny_unet((8, 16), seed=2)
    x_t, t, noise = batch_at([300, 400])
    objective = build_objective({"np": 1.0})
    _, values, parts = objective(student, teacher, x_t, t, noise, None, contributions=True)
    record = term_diagnostics(parts, values, t, list(student.parameters()), 2, [10, 100])
    assert record["rows"] == [0, 0, 2]
    assert record["np"]["value"][:2] == [None, None] and record["np"]["grad_norm"][:2] == [0.0, 0.0]


def test_diagnostics_leave_training_bitwise_unchanged(tiny_training, tmp_path):
    """The loop with diagnostics on logs by_timestep at log steps and ends with the same bits as
    with them off (their backward passes must not touch .grad, the RNG or the graph the step
    needs); the metrics' other values are equal too."""
    from igsm.data import load_images
    from igsm.models import load_model
    from igsm.training import TrainingOptions, train

    images = load_images(tiny_training / "data")
    teacher = load_model(tiny_training / "teacher")
    runs = {}
    for diagnostics in (True, False):
        options = TrainingOptions.from_dict({
            "num_steps": 4, "batch_size": 8, "lr": 1e-3, "log_every": 2, "diagnostics": diagnostics,
            "diagnostic_timesteps": [100, 500], "objective": {"weights": WEIGHTS}})
        folder = tmp_path / str(diagnostics)
        ema, _ = train(load_model(tiny_training / "student"), images, options, folder / "checkpoints",
                       folder / "metrics.jsonl", teacher=teacher)
        records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        runs[diagnostics] = ema.state_dict(), records
    (on_weights, on_records), (off_weights, off_records) = runs[True], runs[False]
    assert all(torch.equal(on_weights[k], off_weights[k]) for k in off_weights)
    assert [r["step"] for r in on_records] == [2, 4]
    for on, off in zip(on_records, off_records):
        diagnosed = on.pop("by_timestep")
        assert diagnosed["ranges"] == [[0.0, 100.0], [100.0, 500.0], [500.0, None]]
        assert sum(diagnosed["rows"]) == 8 and set(WEIGHTS) <= set(diagnosed)
        assert all(n >= 0 for name in WEIGHTS for n in diagnosed[name]["grad_norm"])
        for key in ("sec_per_step", "diagnostics_s"):
            on.pop(key), off.pop(key, None)
        assert on == off


def test_gradient_shares_skip_steps_without_the_jacobian_term(tiny_training, tmp_path):
    """With jacobian_every 2 the loop evaluates the term on steps 0 and 2 (logged as 1 and 3): the
    plotted share comes from those log steps only, as ‖g_jac‖ over the terms' norms of the range;
    the other log steps hold no Jacobian gradient and are left out, not drawn as a share of 0."""
    from igsm.data import load_images
    from igsm.models import load_model
    from igsm.plots import gradient_shares
    from igsm.training import TrainingOptions, train

    options = TrainingOptions.from_dict({
        "num_steps": 4, "batch_size": 8, "lr": 1e-3, "log_every": 1, "diagnostic_timesteps": [500],
        "objective": {"weights": WEIGHTS, "jacobian_every": 2}})
    train(load_model(tiny_training / "student"), load_images(tiny_training / "data"), options,
          tmp_path / "checkpoints", tmp_path / "metrics.jsonl", teacher=load_model(tiny_training / "teacher"))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert ["grad_norm" in r["by_timestep"]["jm2"] for r in records] == [True, False, True, False]
    index = next(i for i, rows in enumerate(records[0]["by_timestep"]["rows"]) if rows)
    steps, shares = gradient_shares(records, index)
    assert steps == [r["step"] for r in (records[0], records[2]) if r["by_timestep"]["rows"][index]]
    first = records[0]["by_timestep"]
    norms = {name: first[name]["grad_norm"][index] for name in WEIGHTS}
    assert shares[0] == pytest.approx(norms["jm2"] / sum(norms.values()))
    assert 0 < shares[0] < 1


def test_the_legend_of_many_runs_goes_under_the_panels_once_per_label():
    """Bug caught: a legend inside a panel hides its lines once a report draws twenty runs (run 29's
    gradient_share.png and loss_curves.png), a label repeated for each rung drawn alike, or a legend
    placed below the figure's edge and cut off."""
    from igsm.plots import _pyplot, legend_below

    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for axis in axes:
        for run in range(25):
            axis.plot([0, 1], [run / 25, 1 - run / 25], label=f"run {run % 22}")  # 22 labels, 3 twice
    legend_below(fig, axes)
    fig.canvas.draw()
    (legend,) = fig.legends
    assert [text.get_text() for text in legend.get_texts()] == [f"run {i}" for i in range(22)]
    box = legend.get_window_extent()
    figure = fig.bbox
    assert figure.x0 <= box.x0 and box.x1 <= figure.x1 and figure.y0 <= box.y0 and box.y1 <= figure.y1
    for axis in axes:
        panel = axis.get_tightbbox()  # the panel with its tick labels and axis label
        assert not panel.overlaps(box), (panel, box)
    plt.close(fig)
