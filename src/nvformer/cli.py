"""The ``nvformer`` command line."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nvformer", description="Nonparametric variational attention for Transformers")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="build an NV Transformer and print what it verifies")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--steps", type=int, default=150, help="training steps of the two small models")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run

        return 0 if run(seed=args.seed, steps=args.steps) else 1
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    raise SystemExit(main())
