"""Write activations of a planted dictionary as x.npy / y.npy for the plug-in example.

    .venv/bin/python examples/plugins/make_data.py examples/plugins/data
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from clt.data.synthetic import PlantedDictionary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="folder to create (must not exist)")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--d-out", type=int, default=16, help="width of y (x has 16)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        sys.exit(f"error: {out} exists; choose a new folder")
    planted = PlantedDictionary(n_layers=3, d_in=16, d_out=args.d_out, n_true_features=64,
                                active_per_layer=4, noise=0.01, seed=0)
    x, y = planted.next_batch(args.tokens)  # [L, T, d]
    out.mkdir(parents=True)
    np.save(out / "x.npy", x.permute(1, 0, 2).numpy())
    np.save(out / "y.npy", y.permute(1, 0, 2).numpy())
    print(f"wrote {args.tokens} tokens x {x.shape[0]} layers to {out}")


if __name__ == "__main__":
    main()
