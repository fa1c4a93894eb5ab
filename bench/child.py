"""One measured run in a fresh interpreter; `bench.compare` starts it and reads the JSON it writes.

Import order is the measurement: only the standard library is loaded before `import torch` is
timed, then the library (`import ember` + its Trainer, or transformers' Trainer), then the model
code. Usage (normally from `bench.compare` only):

    python -m bench.child --impl ember --workload-json '{...}' --out run.json --spawn-time T
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
import traceback
from typing import Any

_MODULE_START = time.perf_counter()


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.child")
    p.add_argument("--impl", required=True, help="raw | ember | hf, optionally with ':accum'")
    p.add_argument("--workload-json", required=True)
    p.add_argument("--out", required=True, help="where to write the result JSON")
    p.add_argument("--spawn-time", type=float, required=True, help="parent's time.time() at spawn")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--compile", action="store_true")
    return p.parse_args(argv)


def import_library(impl: str, res: dict[str, Any]) -> Any:
    """Import the library under test, timing it; returns a namespace with Trainer & friends."""
    t = time.perf_counter()
    if impl == "ember":
        import ember  # noqa: F401  (the bare import is measured on its own)

        res["import_ember_bare_s"] = time.perf_counter() - t
        from ember import Trainer, TrainerCallback, TrainingArguments
    elif impl == "hf":
        import transformers
        from transformers import Trainer, TrainerCallback, TrainingArguments

        res["transformers_version"] = transformers.__version__
    else:
        res["import_lib_s"] = 0.0
        return None
    res["import_lib_s"] = time.perf_counter() - t
    return argparse.Namespace(
        Trainer=Trainer, TrainingArguments=TrainingArguments, TrainerCallback=TrainerCallback
    )


def run(ns: argparse.Namespace, res: dict[str, Any]) -> None:
    t = time.perf_counter()
    import torch

    res["import_torch_s"] = time.perf_counter() - t
    torch.set_num_threads(ns.threads)
    res.update(torch_version=torch.__version__, torch_threads=torch.get_num_threads())
    base, _, variant = ns.impl.partition(":")
    lib = import_library(base, res)

    t = time.perf_counter()
    from . import runners, workloads

    w = workloads.Workload.from_dict(json.loads(ns.workload_json))
    model = workloads.build_model(w)
    res["model_s"] = time.perf_counter() - t
    res["n_params"] = sum(p.numel() for p in model.parameters())
    data = workloads.make_dataset(w, w.eval_samples if w.is_eval else w.train_samples)
    device = runners.pick_device(ns.device)
    if ns.compile:
        model = model.to(device)
        model = torch.compile(model)
    total = -(-w.eval_samples // w.eval_batch) if w.is_eval else w.steps
    clock = runners.StepClock(device, total)
    with tempfile.TemporaryDirectory(prefix=f"bench-{base}-") as out_dir:
        ctx = {"device": device, "clock": clock, "output_dir": out_dir, "bf16": ns.bf16, "variant": variant}
        if lib is None:
            result = (runners.raw_eval if w.is_eval else runners.raw_train)(model, data, w, ctx)
        else:
            result = runners.trainer_run(lib, model, data, w, ctx)
    res.update(result)
    res.update(clock.summary(result.pop("end")))
    res["tokens"] = w.seq * (w.eval_samples if w.is_eval else w.train_samples)


def main(argv: list[str] | None = None) -> int:
    ns = parse(sys.argv[1:] if argv is None else argv)
    res: dict[str, Any] = {"impl": ns.impl, "pid": os.getpid(), "ok": False}
    code = 0
    try:
        run(ns, res)
        res["ok"] = True
    except Exception:  # the parent reports the failure and goes on with the other runs
        res["error"] = traceback.format_exc()[-4000:]
        print(res["error"], file=sys.stderr)
        code = 1
    first = res.pop("first_step_wall", None)
    res["time_to_first_step_s"] = first - ns.spawn_time if first is not None else None
    res["child_s"] = time.perf_counter() - _MODULE_START
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    scale = 1 / (1024 * 1024) if sys.platform == "darwin" else 1 / 1024
    usage = resource.getrusage(resource.RUSAGE_SELF)
    res["peak_rss_mib"] = usage.ru_maxrss * scale
    res["process_cpu_s"] = usage.ru_utime + usage.ru_stime
    sys.stdout.flush()
    tmp = ns.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=1, default=str)
    os.replace(tmp, ns.out)
    return code


if __name__ == "__main__":
    sys.exit(main())
