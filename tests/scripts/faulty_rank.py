"""``train.py`` under torchrun with one rank made faulty, for tests/test_parallel_train.py.

    torchrun ... tests/scripts/faulty_rank.py {raise|hang} CONFIG [train.py arguments]

Rank 1 raises (or sleeps for 10 minutes) in its third training step; the other ranks must stop
with an error instead of waiting forever.
"""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import train  # noqa: E402

real_step = train.train_step


def faulty_step(*args, **kwargs):
    if int(os.environ["RANK"]) == 1 and args[5] == 2:  # step index 2: the third step
        if mode == "raise":
            raise RuntimeError("injected failure")
        time.sleep(600)
    return real_step(*args, **kwargs)


mode = sys.argv.pop(1)
train.train_step = faulty_step
train.main(sys.argv[1:])
