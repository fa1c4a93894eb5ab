"""GPT-2 124M on one H100/H200: raw loop vs ember vs transformers Trainer, bf16, compile off and on.

    bash bench/gpu.sh                      # or: python -m bench.gpu --peak-flops 989e12

Sized to finish in about 5 minutes: one round, 40 steps of 16 x 1024 tokens per implementation
and compile mode (the first compiled run pays the compile; later ones hit inductor's cache).
MFU = 6 * N * tokens/s / peak, with N every parameter (tied embeddings once) and tokens/s from
the steady steps (after step 10, synchronised). The peak defaults to 989e12, the dense bf16 peak
of an H100/H200 SXM; pass --peak-flops for another device. On a machine without CUDA it says so
and exits 0 without running anything.
"""

from __future__ import annotations

import argparse
import sys

from . import compare


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--peak-flops", type=float, default=989e12, help="device dense bf16 peak FLOP/s")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--compile", default="both", choices=("off", "on", "both"))
    p.add_argument("--threads", type=int, default=8, help="CPU threads per child (data loading, launch)")
    p.add_argument("--impls", default="raw,ember,hf")
    p.add_argument("--tag", default="gpu")
    ns = p.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print(
            f"bench.gpu: no CUDA device visible (torch {torch.__version__}); this benchmark needs an "
            "H100/H200-class GPU, so nothing was run. On CPU, use `python -m bench.compare`.",
            file=sys.stderr,
        )
        return 0
    print(f"bench.gpu: {torch.cuda.get_device_name()}; MFU against {ns.peak_flops:.4g} FLOP/s", flush=True)
    return compare.main(
        [
            "--workloads", "g", "--device", "cuda", "--bf16", "--compile", ns.compile,
            "--steps", str(ns.steps), "--reps", str(ns.reps), "--threads", str(ns.threads),
            "--impls", ns.impls, "--peak-flops", repr(ns.peak_flops), "--tag", ns.tag,
            "--no-warmup", "--timeout", "240",
        ]
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
