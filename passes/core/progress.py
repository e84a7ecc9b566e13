"""Progress bars (tqdm) for the long steps: tuning, calibration, distillation.

A bar is drawn on stderr only when the caller asked for progress (``enabled``) and stderr is a terminal (tqdm's
``disable=None``), so logs, pipes and the CLI's ``--json`` stay clean. Closed bars leave no line behind.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

from tqdm import tqdm


def progress_bar(iterable: Iterable | None = None, *, enabled: bool, desc: str, total: int | None = None,
                 unit: str = "it") -> tqdm:
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=None if enabled else True, file=sys.stderr,
                leave=False, dynamic_ncols=True)
