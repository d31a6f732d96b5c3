"""SM clock and power while the GPU runs (a) one 3×3 convolution back to back and (b) the compiled
fast-path network call, each for ``--seconds``: is a convolution slower alone than inside the
network because the card lowers its clock under sustained tensor-core load? (issue 5)

    python benchmarks/clock_trace.py --seconds 8 --out clock_trace.json
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import network_speed  # noqa: E402
from igsm.models import build_unet  # noqa: E402


def sample_clocks(fn, seconds, calls_per_check=10):
    """Runs fn repeatedly for ``seconds`` while nvidia-smi samples SM clock and power every 100 ms;
    returns ms per call and the median clock (MHz) and power (W) of the second half."""
    smi = subprocess.Popen(["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits",
                            "-lms", "100"], stdout=subprocess.PIPE, text=True)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin, calls = time.perf_counter(), 0
    start.record()
    while time.perf_counter() - begin < seconds:
        for _ in range(calls_per_check):
            fn()
        calls += calls_per_check
        torch.cuda.synchronize()
    end.record()
    torch.cuda.synchronize()
    smi.terminate()
    rows = [tuple(float(v) for v in line.split(",")) for line in smi.communicate()[0].splitlines() if "," in line]
    late = sorted(rows[len(rows) // 2:])
    return {"ms_per_call": start.elapsed_time(end) / calls, "sm_clock_mhz": late[len(late) // 2][0],
            "power_w": sorted(p for _, p in late)[len(late) // 2], "samples": rows}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.manual_seed(0)
    x = torch.randn(500, 128, 32, 32, device=device, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(128, 128, 3, 3, device=device, dtype=torch.bfloat16) / 34
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "args": vars(args)}
    report["conv 128->128 @32x32, batch 500"] = sample_clocks(lambda: F.conv2d(x, weight, padding=1), args.seconds)
    dense = build_unet({**network_speed.ARCHITECTURE, "dropout": 0.0}).eval().to(device)
    name = "autocast+cl+cudagraphs+csgn"
    xs = [torch.randn(500, 3, 32, 32, device=device) for _ in range(3)]
    t = torch.full((500,), 500, device=device, dtype=torch.long)
    with torch.no_grad(), network_speed.flags("bf16", device):
        call = network_speed.make_call(dense, name)
        for i in range(3):
            call(xs[i], t)
        report[f"network {name}, batch 500"] = sample_clocks(lambda: call(xs[0], t), args.seconds)
        report["conv again"] = sample_clocks(lambda: F.conv2d(x, weight, padding=1), args.seconds)
    for key, value in report.items():
        if isinstance(value, dict) and "ms_per_call" in value:
            print(f"{key:50s} {value['ms_per_call'] * 1e3:9.1f} us/call  {value['sm_clock_mhz']:6.0f} MHz  "
                  f"{value['power_w']:5.0f} W")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
