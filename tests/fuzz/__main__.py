"""``python -m tests.fuzz --models N --seed S``: fuzz N random models (seeds S..S+N-1) through the pipelines and
write each failure (seed, pipeline, model spec) into ``--failures``; ``--replay FILE`` reruns one failure."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tests.fuzz.run import PIPELINES, check, fuzz, pipelines_for


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__)
    parser.add_argument("--models", type=int, default=20, help="number of random models")
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--pipelines", default=",".join(PIPELINES), help=f"comma list of {', '.join(PIPELINES)}")
    parser.add_argument("--failures", default="fuzz-failures", help="folder for failing cases (JSON)")
    parser.add_argument("--replay", metavar="FILE", help="rerun one failure file")
    args = parser.parse_args(argv)
    if args.replay:
        record = json.loads(Path(args.replay).read_text())
        (name, pipeline), = pipelines_for(record["spec"], [record["pipeline"]])
        status, detail = check(record["spec"], name, pipeline)
        print(status, detail)
        return 0 if status in ("ok", "refused") else 1
    names = args.pipelines.split(",")
    unknown = sorted(set(names) - set(PIPELINES))
    if unknown:
        parser.error(f"unknown pipelines {unknown}")
    summary = fuzz(list(range(args.seed, args.seed + args.models)), names, Path(args.failures),
                   log=lambda line: print(line, flush=True))
    print(summary.text())
    return 0 if summary.count("crash") + summary.count("mismatch") == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
