"""Data-parallel distillation on real data: the digits CNN (``tests/e2e/digits.py``) pruned 50% and distilled in
one process and in two (``torchrun``, gloo on loopback), the same global batch of 64 (32 per rank), held-out
accuracy through the compiled TVM module, wall times.

    python benchmarks/distributed_digits.py [--rounds 3]   # runs both (interleaved), prints a Markdown table
    torchrun --nproc-per-node 2 benchmarks/distributed_digits.py --worker   # one run, what the table times

Wall time is the whole process (start, teacher training, prune, distill, TVM build); ``distill`` is the pass
alone, from the report (rank 0's); CPU is user + system time of every process together. On a 2-core machine two
ranks share the cores one process already uses (torch's intra-op threads), so data parallelism buys no time
there: it is for more machines, or more cores than one process uses.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GLOBAL_BATCH = 64
PIPELINE = ["prune-channels{ratio=0.5}", "distill{epochs=30,lr=0.003,temperature=2}"]


def worker() -> None:
    """One rank (or the single process): prune + distill on this rank's share of every global batch."""
    import torch

    import passes
    from passes.core import distributed
    from tests.e2e import digits

    world = distributed.world()
    x_train, x_test, y_train, y_test = digits.split()
    per_rank = GLOBAL_BATCH // world.size  # items r, r + N... of this size: N of them make one global batch
    data = [(x_train[i:i + per_rank, None], y_train[i:i + per_rank]) for i in range(0, len(x_train), per_rank)]
    opt = passes.optimize(digits.cnn(), passes=PIPELINE, example_inputs=(torch.from_numpy(x_test[:, None]),),
                          data=data, measure=False)
    if world.main:
        distill = next(p for p in opt.report.passes if p.name == "distill")
        print(json.dumps({"ranks": world.size, "accuracy": digits.accuracy(opt, x_test[:, None], y_test),
                          "distill_s": distill.seconds, "steps": distill.stats["steps"],
                          "loss_end": distill.stats["loss_end_milli"] / 1000}))


def timed(ranks: int, one_thread: bool = False) -> dict:
    """One run: a single process (with torch's default threads, or one thread as torchrun gives each rank when
    it starts several per host) or ``ranks`` processes under torchrun."""
    from tests.helpers import torchrun

    script = [str(Path(__file__).resolve()), "--worker"] + (["--one-thread"] if one_thread else [])
    start, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run([sys.executable, *script] if ranks == 1 else [*torchrun(ranks), *script], cwd=ROOT,
                            capture_output=True, text=True, check=True)
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime  # every rank, waited for by torchrun
    return json.loads(result.stdout.strip().splitlines()[-1]) | {"wall_s": wall, "cpu_s": cpu}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help="run one rank (under torchrun) or one process")
    parser.add_argument("--one-thread", action="store_true", help="worker: torch.set_num_threads(1)")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds of 1 and 2 processes")
    args = parser.parse_args()
    if args.worker:
        if args.one_thread:  # as torchrun's ranks run when it starts several per host; set here, not by environment
            import torch

            torch.set_num_threads(1)
        worker()
        return 0
    configs = {"1 process": (1, False), "1 process, 1 thread": (1, True), "2 processes (torchrun)": (2, False)}
    runs: dict[str, list[dict]] = {name: [] for name in configs}
    for _ in range(args.rounds):
        for name, config in configs.items():
            runs[name].append(timed(*config))
            print(f"# {name}: {runs[name][-1]}", flush=True)
    print("| run | held-out accuracy | steps | distill (median s) | wall (median s) | CPU (median s) |")
    print("|---|---|---|---|---|---|")
    for name, results in runs.items():
        accuracy = sorted({f"{r['accuracy']:.2f}%" for r in results})
        median = {key: statistics.median(r[key] for r in results) for key in ("distill_s", "wall_s", "cpu_s")}
        print(f"| {name} | {', '.join(accuracy)} | {results[0]['steps']} | {median['distill_s']:.1f} | "
              f"{median['wall_s']:.1f} | {median['cpu_s']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
