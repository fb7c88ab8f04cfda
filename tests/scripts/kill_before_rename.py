"""``train.py`` under torchrun, killed (SIGKILL, no cleanup) the moment a checkpoint folder is
complete but not yet renamed into place, for tests/test_reliability.py.

    torchrun ... tests/scripts/kill_before_rename.py STEP CONFIG [train.py arguments]

Rank 0 kills itself just before renaming the temp folder of step ``STEP``; torchrun then stops
the other rank.
"""

import os
import re
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import clt.checkpoint  # noqa: E402
import train  # noqa: E402

step = int(sys.argv.pop(1))
real_replace = os.replace


def replace_or_die(src, dst, *args, **kwargs):
    if re.fullmatch(rf"\.step_{step:08d}\..*\.tmp", Path(src).name) and Path(src).is_dir():
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst, *args, **kwargs)


clt.checkpoint.os.replace = replace_or_die  # the module's os: the rename of the folder

if __name__ == "__main__":
    train.main(sys.argv[1:])
