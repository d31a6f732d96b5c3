"""Speed of one denoiser call (the cost of a sampling step) under numerics and compiler variants,
with a kernel-time breakdown: where the time of 100-step DDIM goes on a GPU (issue 5, Sec. 5.1).

Each variant is the dense CIFAR-10 DDPM U-Net (random weights, config/config.yaml) called on a
batch of ``--batch`` noisy images: the median over ``--repeats`` timings of ``--iters`` calls,
after warm-up (which also compiles). ``images/s (100 steps)`` = calls/s × batch / 100: the rate
of DDIM-100 if the sampler added nothing. ``TFLOP/s`` counts 2 × MACs per image (6.06 GMACs).

    python benchmarks/network_speed.py --variants "autocast+cl+compile,autocast+cl+cudagraphs+csgn" --out speed.json
    python benchmarks/network_speed.py --variants autocast+cl+compile+csgn --profile --out profile.json

Variants run in turn in one process (all of them by default; max-autotune alone compiles for more
than five minutes). cuDNN keeps its algorithm choice per shape for the process, so "(all cuDNN
algos)" measures something only when it runs first. BENCHMARKS.md has the results.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from igsm.models import build_unet, predict_noise  # noqa: E402
from igsm.sampling import numerics, use_channel_stats_group_norm  # noqa: E402

ARCHITECTURE = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["experiments"]["cifar10_unet"][
    "architecture"]
MACS_PER_IMAGE = 6.0641e9

def variant(weights="bf16", channels_last=True, mode="default", inductor=None, flags="bf16",
            group_norm="native", attention="default", streams=0):
    """weights: fp32 | bf16 | fp16 | autocast (fp32 weights under bf16 autocast); mode: a
    torch.compile mode or None (eager); inductor: Inductor options; flags: the numerics of
    ``igsm.sampling.numerics`` or one of ``flags()``'s variants; group_norm: native |
    channel-stats (``igsm.sampling.ChannelStatsGroupNorm``); attention: default | flash
    (scaled_dot_product_attention restricted to the flash kernel); streams: k > 0 splits the batch
    into k chunks, each on its own CUDA stream, all k forwards captured into one CUDA graph (the
    memory-bound kernels of one chunk may then run beside the convolutions of another)."""
    return dict(weights=weights, channels_last=channels_last, mode=mode, inductor=inductor or {}, flags=flags,
                group_norm=group_norm, attention=attention, streams=streams)


VARIANTS = {
    "fp32 strict eager": variant("fp32", False, None, flags="fp32"),
    "fp32 strict +cl+compile": variant("fp32", flags="fp32"),
    "fp32 +cl+compile (cudnn.benchmark)": variant("fp32", flags="fp32-benchmark"),
    "autocast+cl+compile": variant("autocast"),
    "autocast+cl+compile+csgn": variant("autocast", group_norm="channel-stats"),
    "autocast+cl+cudagraphs": variant("autocast", mode="reduce-overhead"),
    "autocast+cl+cudagraphs+csgn": variant("autocast", mode="reduce-overhead", group_norm="channel-stats"),
    "autocast+cl+compile+csgn+flash": variant("autocast", group_norm="channel-stats", attention="flash"),
    "autocast+cl+cudagraphs+csgn+coordesc": variant("autocast", mode="reduce-overhead", group_norm="channel-stats",
                                                    inductor={"coordinate_descent_tuning": True}),
    "autocast+cl+cudagraphs+csgn+multi-kernel": variant("autocast", mode="reduce-overhead",
                                                        group_norm="channel-stats",
                                                        inductor={"triton.multi_kernel": 1}),
    "autocast+cl+cudagraphs+csgn+combo": variant("autocast", mode="reduce-overhead", group_norm="channel-stats",
                                                 inductor={"combo_kernels": True}),
    "autocast+cl+csgn+graph-1stream": variant("autocast", group_norm="channel-stats", streams=1),
    "autocast+cl+csgn+graph-2streams": variant("autocast", group_norm="channel-stats", streams=2),
    "autocast+cl+csgn+graph-4streams": variant("autocast", group_norm="channel-stats", streams=4),
    "bf16w+cl+cudagraphs+csgn": variant(mode="reduce-overhead", group_norm="channel-stats"),
    "bf16w+cl+compile": variant(),
    "bf16w+cl+compile (all cuDNN algos)": variant(flags="bf16-all-algos"),
    "fp16w+cl+compile": variant("fp16"),
    "bf16w+cl+freeze": variant(inductor={"freezing": True}),
    "bf16w+cl+freeze+csgn": variant(inductor={"freezing": True}, group_norm="channel-stats"),
    "bf16w+cl+freeze+csgn+flash": variant(inductor={"freezing": True}, group_norm="channel-stats",
                                          attention="flash"),
    "bf16w+cl+freeze+cudagraphs": variant(mode="reduce-overhead", inductor={"freezing": True}),
    "bf16w+cl+freeze+coordesc": variant(inductor={"freezing": True, "coordinate_descent_tuning": True}),
    "bf16w+cl+freeze+aggressive-fusion": variant(inductor={"freezing": True, "aggressive_fusion": True}),
    "bf16w+cl+max-autotune": variant(mode="max-autotune-no-cudagraphs"),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@contextlib.contextmanager
def flags(kind, device):
    if kind == "fp32-benchmark":  # fp32 numbers (TF32 off) but cuDNN may time its algorithms
        with numerics("fp32", device):
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, True
            yield
    elif kind == "bf16-all-algos":  # cuDNN times every algorithm, not the first 10 of its heuristics
        with numerics("bf16", device):
            saved, torch.backends.cudnn.benchmark_limit = torch.backends.cudnn.benchmark_limit, 0
            try:
                yield
            finally:
                torch.backends.cudnn.benchmark_limit = saved
    else:
        with numerics(kind, device):
            yield


def make_call(dense, name):
    v = VARIANTS[name]
    net = copy.deepcopy(dense)
    if v["weights"] in DTYPES:
        net = net.to(DTYPES[v["weights"]])
    if v["channels_last"]:
        net = net.to(memory_format=torch.channels_last)
    if v["group_norm"] == "channel-stats":
        use_channel_stats_group_norm(net)
    torch._dynamo.reset()
    forward = torch.compile(net, mode=v["mode"], dynamic=False) if v["mode"] else net
    in_dtype = DTYPES.get(v["weights"], torch.float32)

    def call(x, t):
        x = x.to(in_dtype)
        if v["channels_last"]:
            x = x.contiguous(memory_format=torch.channels_last)
        if v["mode"] == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        with contextlib.ExitStack() as stack:
            if v["weights"] == "autocast":
                stack.enter_context(torch.autocast("cuda", torch.bfloat16))
            if v["attention"] == "flash":
                from torch.nn.attention import SDPBackend, sdpa_kernel

                stack.enter_context(sdpa_kernel(SDPBackend.FLASH_ATTENTION))
            return predict_noise(forward, x, t).float()

    return call


def make_stream_graph_call(call, batch, streams, device):
    """Replays one CUDA graph holding ``streams`` forwards of batch/streams images each, every
    chunk on its own stream (independent branches of the graph, which the GPU may overlap)."""
    chunk = batch // streams
    static_x = torch.randn(batch, 3, 32, 32, device=device)
    static_t = torch.full((batch,), 500, device=device, dtype=torch.long)
    side = [torch.cuda.Stream(device) for _ in range(streams)]

    def forward_chunks():
        main = torch.cuda.current_stream(device)
        outs = []
        for i, stream in enumerate(side):
            stream.wait_stream(main)
            with torch.cuda.stream(stream):
                outs.append(call(static_x[i * chunk:(i + 1) * chunk], static_t[i * chunk:(i + 1) * chunk]))
        for stream in side:
            main.wait_stream(stream)
        return outs

    warm = torch.cuda.Stream(device)  # warm-up (compilation, cuDNN plans) off the capture stream
    warm.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(warm):
        for _ in range(3):
            forward_chunks()
    torch.cuda.current_stream(device).wait_stream(warm)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = forward_chunks()

    def replay(x, t):
        static_x.copy_(x)
        static_t.copy_(t)
        graph.replay()
        return torch.cat(static_out)

    return replay


def time_calls(call, xs, t, iters, repeats):
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(iters):
            call(xs[i % len(xs)], t)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / iters)
    return statistics.median(times), times


def kernel_category(name: str) -> str:
    name = name.lower()
    if name.startswith("triton"):  # Inductor's fused kernels (names list the ops they absorbed)
        return "triton: norm/elementwise/copies"
    if "sdpa" in name or "flash" in name or "fmha" in name:
        return "attention"
    if "xmma_fprop" in name or "implicit" in name or "conv" in name or "flip_filter" in name:
        return "convolution (cuDNN)"
    if "gemm" in name or "nvjet" in name or "cutlass" in name:
        return "matmul (cuBLAS)"
    return "other"


def profile(call, xs, t, top):
    """Device time of each kernel (CUDA activity only: no CPU-op double counting) and of each
    convolution shape (CPU ops with their shapes)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    calls = 3
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(calls):
            call(xs[i % len(xs)], t)
        torch.cuda.synchronize()
    kernels = sorted((e for e in prof.key_averages() if e.self_device_time_total > 0),
                     key=lambda e: -e.self_device_time_total)
    total = sum(e.self_device_time_total for e in kernels)
    categories = {}
    for e in kernels:
        cat = kernel_category(e.key)
        categories[cat] = categories.get(cat, 0.0) + e.self_device_time_total / calls / 1e3
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for i in range(calls):
            call(xs[i % len(xs)], t)
        torch.cuda.synchronize()
    convs = []
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key == "aten::convolution" and e.device_time_total > 0 and len(e.input_shapes) > 1:
            x_shape, w_shape = e.input_shapes[0], e.input_shapes[1]
            # MACs at stride 1 (the three downsampling convs have stride 2: a quarter of this)
            macs = x_shape[0] * x_shape[2] * x_shape[3] * w_shape[0] * w_shape[1] * w_shape[2] * w_shape[3]
            us = e.device_time_total / e.count
            convs.append({"input": x_shape, "weight": w_shape, "calls_per_forward": e.count / calls,
                          "us_per_call": us, "tflops_at_stride_1": 2 * macs / us / 1e6})
    convs.sort(key=lambda c: -c["us_per_call"] * c["calls_per_forward"])
    return {"kernel_ms_per_call": total / calls / 1e3,
            "categories_ms": dict(sorted(categories.items(), key=lambda kv: -kv[1])),
            "kernels": [{"name": e.key[:160], "category": kernel_category(e.key),
                         "us_per_forward": e.self_device_time_total / calls,
                         "launches_per_forward": e.count / calls} for e in kernels[:top]],
            "convolutions": convs}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names")
    parser.add_argument("--batch", type=int, nargs="+", default=[500])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="kernel breakdown of each variant")
    parser.add_argument("--top", type=int, default=80)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    device = torch.device("cuda")
    torch.manual_seed(0)
    dense = build_unet({**ARCHITECTURE, "dropout": 0.0}).eval().to(device)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "args": vars(args), "rows": []}
    for variant in args.variants.split(","):
        for batch in args.batch:
            xs = [torch.randn(batch, 3, 32, 32, device=device) for _ in range(3)]
            t = torch.full((batch,), 500, device=device, dtype=torch.long)
            row = {"variant": variant, "batch": batch}
            try:
                # Inductor reads its options when it compiles: at the first call.
                with torch.no_grad(), flags(VARIANTS[variant]["flags"], device), \
                        torch._inductor.config.patch(VARIANTS[variant]["inductor"]):
                    call = make_call(dense, variant)
                    if VARIANTS[variant]["streams"]:
                        call = make_stream_graph_call(call, batch, VARIANTS[variant]["streams"], device)
                    begin = time.perf_counter()
                    for i in range(3):
                        call(xs[i], t)
                    torch.cuda.synchronize()
                    row["warmup_s"] = time.perf_counter() - begin
                    seconds, all_times = time_calls(call, xs, t, args.iters, args.repeats)
                    row.update(ms_per_call=seconds * 1e3, spread_ms=[s * 1e3 for s in all_times],
                               images_per_s_100_steps=batch / seconds / 100,
                               tflops=2 * MACS_PER_IMAGE * batch / seconds / 1e12)
                    if args.profile:
                        row["profile"] = profile(call, xs, t, args.top)
            except Exception as err:  # one failing variant must not end the run
                row["error"] = f"{type(err).__name__}: {str(err)[:500]}"
            report["rows"].append(row)
            print(json.dumps(row), flush=True)
            if args.out:
                Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"\n{'variant':45s} {'batch':>6s} {'ms/call':>9s} {'img/s@100':>10s} {'TFLOP/s':>8s}")
    for row in report["rows"]:
        if "error" in row:
            print(f"{row['variant']:45s} {row['batch']:6d} {row['error'][:60]}")
        else:
            print(f"{row['variant']:45s} {row['batch']:6d} {row['ms_per_call']:9.2f} "
                  f"{row['images_per_s_100_steps']:10.1f} {row['tflops']:8.1f}")


if __name__ == "__main__":
    main()
