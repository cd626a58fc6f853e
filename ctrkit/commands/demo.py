"""``ctrkit demo``: a self-contained tour of the cross layers on synthetic data (no Beam, no TFT)."""
from __future__ import annotations

import argparse

from ctrkit.commands._arguments import positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="train a small DCN-V2 cross network on synthetic crosses and print its loss",
        description="Fits a 2-layer Cross network and a ReLU DNN of equal size on data whose label is a "
        "planted feature cross, and prints both losses. Needs only Keras.",
    )
    p.add_argument("--steps", type=positive_int, default=300, help="training steps (default: 300)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ctrkit.demo import cross_vs_dnn

    result = cross_vs_dnn(steps=args.steps, seed=args.seed)
    print(f"cross network ({result['cross_params']} params): final MSE {result['cross_loss']:.5f}")
    print(f"ReLU DNN      ({result['dnn_params']} params): final MSE {result['dnn_loss']:.5f}")
    return 0
