"""A trainer process for the tests: builds an honest update of a tiny model (the same tensors
the tests build for a path push with that seed), pushes it through refitd_client, and prints
one JSON line: {"pid", "record"} or {"pid", "error", "type", "status_code", "update"}.

    python -m tests.refitd_client._trainer --url URL --token T --config config.json --seed 7
        [--device cpu|cuda] [--nan NAME] [--label L] [--no-wait] [--export-only]

--export-only prints {"pid", "source"} (the JSON `source` of a push) and keeps the export alive
until stdin closes: the tests post it themselves, or kill this process mid-copy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from orchestrator.model.synthetic import base_state, honest_update
from refitd_client import Client, RefitdError
from refitd_client.tensors import export_tensors


def state_for(config: dict, seed: int, device: str) -> dict[str, torch.Tensor]:
    """The update a test pushes for `seed` (also written as a checkpoint by the tests)."""
    return {
        n: t.to(device) for n, t in honest_update(base_state(config, seed=0), seed=seed).items()
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--nan", default=None)
    parser.add_argument("--label", default=None)
    parser.add_argument("--no-wait", action="store_true")
    parser.add_argument("--export-only", action="store_true")
    args = parser.parse_args()

    state = state_for(json.loads(args.config.read_text()), args.seed, args.device)
    if args.nan:
        state[args.nan].view(-1)[3] = float("nan")
    if args.export_only:
        with export_tensors(state) as export:
            print(json.dumps({"pid": os.getpid(), "source": export.source()}), flush=True)
            sys.stdin.read()
        return
    with Client(args.url, args.token) as client:
        try:
            record = client.push(state, label=args.label, wait=not args.no_wait)
        except RefitdError as exc:
            out = {"error": exc.detail, "type": type(exc).__name__,
                   "status_code": exc.status_code, "update": exc.update}  # fmt: skip
            print(json.dumps({"pid": os.getpid(), **out}), flush=True)
            return
    print(json.dumps({"pid": os.getpid(), "record": record}), flush=True)


if __name__ == "__main__":
    main()
