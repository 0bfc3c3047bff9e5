"""Model-only speed on one accelerator (or this CPU): how close the shipped models come to the device's peak.

    python bench/accelerator.py [--models sentinel2-lulc aerial-rgb] [--batches 1 4 16 64 256]

For each shipped model it counts the floating-point operations of one forward pass over a tile with its
halo (``torch.utils.flop_counter``), times ``geoseg.infer.predict`` (the inference actor's own forward
pass: bf16 autocast and channels_last on a GPU, fp32 on a CPU) over batches already on the device, and
compares the rate with the device's measured matrix-product peak in the same precision (a large square
product, the best case for the device's matrix units). It also times one training step (forward,
backward, AdamW) at the model's own training batch and chip size, bf16 autocast on a GPU, to size
training budgets. Prints a table, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from geoseg.infer import predict
from geoseg.model import SHIPPED
from geoseg.model.checkpoint import load_model, read_checkpoint


def timed(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 3) -> float:
    """Median seconds of `fn` after warm-up, synchronising the device around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_peak_tflops(device: torch.device) -> float:
    """Measured TFLOP/s of a large square matrix product: bf16 on a GPU, fp32 on a CPU."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (2048, torch.float32)
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    return 2 * n**3 / timed(lambda: a @ b, device, repeats=10) / 1e12


def forward_flops(model: torch.nn.Module, bands: int, side: int) -> int:
    """Floating-point operations of one forward pass over one tile of side x side pixels."""
    device = next(model.parameters()).device
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, bands, side, side, device=device))
    return int(counter.get_total_flops())


def train_step_s(name: str, device: torch.device) -> tuple[float, int, int]:
    """Seconds per training step at the model's training batch and chip size; (seconds, batch, chip)."""
    card, model = load_model(name, device=str(device))
    config = json.loads(read_checkpoint(name)["extra"]["config"])
    batch, chip = int(config["batch_size"]), int(config["chip"])
    model = model.train().to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, len(card.bands), chip, chip, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, len(card.classes), (batch, chip, chip), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return timed(step, device, repeats=20), batch, chip


def bench_model(name: str, device: torch.device, batches: list[int], peak: float) -> dict[str, object]:
    """Model-only Mpx/s of tile cores and the fraction of `peak` reached, per batch size."""
    card, model = load_model(name, device=str(device))
    side, core = card.tile_size + 2 * card.halo, card.tile_size
    model = model.to(memory_format=torch.channels_last)
    flops = forward_flops(model, len(card.bands), side)
    class_ids = torch.as_tensor(card.class_ids, device=device)
    bf16 = device.type == "cuda"
    rows = []
    for batch in batches:
        x = torch.randn(batch, len(card.bands), side, side, device=device)
        seconds = timed(lambda x=x: predict(model, x, class_ids, bf16), device, repeats=10 if bf16 else 3, warmup=2)
        rows.append({"batch": batch, "mpx_s": round(batch * core * core / seconds / 1e6, 2),
                     "tiles_s": round(batch / seconds, 1), "tflops": round(flops * batch / seconds / 1e12, 3),
                     "fraction_of_peak": round(flops * batch / seconds / 1e12 / peak, 4)})
    step_s, train_batch, chip = train_step_s(name, device)
    return {"model": name, "tile": side, "core": core, "gflop_per_tile": round(flops / 1e9, 3),
            "gflop_per_core_mpx": round(flops / (core * core / 1e6) / 1e9, 2), "by_batch": rows,
            "best": max(rows, key=lambda r: r["mpx_s"]),  # type: ignore[arg-type, return-value]
            "train_step_ms": round(step_s * 1e3, 2), "train_batch": train_batch, "train_chip": chip}


def main() -> None:
    """Print the table and the JSON line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=sorted(SHIPPED))
    ap.add_argument("--batches", nargs="*", type=int, help="batch sizes (default 1 4 16 64 256 on a GPU, 1 4 on a CPU)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batches = args.batches or ([1, 4, 16, 64, 256] if device.type == "cuda" else [1, 4])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    peak = matmul_peak_tflops(device)
    print(f"device: {name}; measured matmul peak {peak:.1f} TFLOP/s ({'bf16' if device.type == 'cuda' else 'fp32'})")
    results = []
    for model in args.models:
        r = bench_model(model, device, batches, peak)
        results.append(r)
        print(f"{model}: {r['gflop_per_tile']} GFLOP per {r['tile']} px tile "
              f"({r['gflop_per_core_mpx']} GFLOP per output Mpx); "
              f"training step {r['train_step_ms']} ms ({r['train_batch']} chips of {r['train_chip']} px)")
        for row in r["by_batch"]:  # type: ignore[attr-defined]
            print(f"  batch {row['batch']:4d}: {row['mpx_s']:9.2f} Mpx/s  {row['tiles_s']:9.1f} tiles/s  "
                  f"{row['tflops']:8.3f} TFLOP/s  {row['fraction_of_peak']:.2%} of peak")
    print(json.dumps({"device": name, "peak_tflops": round(peak, 2), "models": results}))


if __name__ == "__main__":
    main()
