"""`make demo`: refitd end to end on the embedded defaults, with a scripted trainer.

It starts `refitd serve` (embedded Redis, two local rank agents), pushes updates of a tiny
Qwen3-style model the way a trainer would, shows the per-channel fallback, the verification gate
and a refused corrupted update, rolls back with `refitctl`, and stops everything it started.
Every step is the real daemon, real processes and real Redis; nothing is simulated.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import torch
from safetensors.torch import save_file

from orchestrator.model import synthetic

DEMO_DIR = Path(".refitd-demo")
DEFAULT_PORT = 8470
TP_SIZE = 2
# hidden 256, 2 layers; intermediate 640 gives MLP shards of 320 at TP 2, not a multiple of 128.
MODEL: dict[str, Any] = {
    "model_type": "qwen3",
    "hidden_size": 256,
    "intermediate_size": 640,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 128,
    "vocab_size": 512,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}


def say(text: str = "") -> None:
    print(text, flush=True)


def step(n: int, text: str) -> None:
    say(f"\n\033[1m[{n}] {text}\033[0m")


def _port() -> int:
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", DEFAULT_PORT)) != 0:
            return DEFAULT_PORT
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    say(f"    (port {DEFAULT_PORT} is busy; using {port})")
    return port


def _save(state: dict[str, torch.Tensor], path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, path / "model.safetensors")
    return path


class Demo:
    def __init__(self) -> None:
        self.root = DEMO_DIR.resolve()
        self.checkpoints = self.root / "checkpoints"
        self.port = _port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.trainer_token = secrets.token_urlsafe(24)
        self.admin_token = secrets.token_urlsafe(24)
        self.daemon: subprocess.Popen[bytes] | None = None
        self.log_path = self.root / "refitd.log"
        self._log_seen = 0

    # Processes -------------------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("REFITD_")}
        env.update(
            REFITD_DATA_DIR=str(self.root / "data"),
            REFITD_SERVER__PORT=str(self.port),
            REFITD_AUTH__TRAINER_TOKEN=self.trainer_token,
            REFITD_AUTH__ADMIN_TOKEN=self.admin_token,
            REFITD_MODEL__CONFIG=str(self.root / "model" / "config.json"),
            REFITD_RANKS__TP_SIZE=str(TP_SIZE),
            REFITD_SOURCES__ALLOWED_ROOTS=json.dumps([str(self.checkpoints)]),
            REFITCTL_URL=self.url,
        )
        return env

    def start_daemon(self) -> None:
        log = self.log_path.open("ab")
        self.daemon = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", "serve"],
            env=self.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.daemon.poll() is not None:
                say(self.log_path.read_text()[-3000:])
                raise SystemExit("refitd serve exited; its log is above")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise SystemExit("refitd serve did not answer /healthz within 60 s")

    def stop_daemon(self) -> None:
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.send_signal(signal.SIGTERM)
            try:
                self.daemon.wait(30)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait()

    def refitctl(self, *args: str, token: str, check: bool = True) -> int:
        say(f"    $ refitctl {' '.join(args)}")
        env = {**self.env(), "REFITCTL_TOKEN": token}
        done = subprocess.run([sys.executable, "-m", "orchestrator.ctl", *args], env=env)
        if check and done.returncode != 0:
            raise SystemExit(f"refitctl {args[0]} failed with exit code {done.returncode}")
        return done.returncode

    def new_log(self, grep: str) -> None:
        """Print the daemon's log lines since the last call that contain `grep`."""
        lines = self.log_path.read_text(errors="replace").splitlines()
        for line in lines[self._log_seen :]:
            if grep in line:
                say(f"    refitd log | {line}")
        self._log_seen = len(lines)

    def get(self, path: str) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.admin_token}"}
        return httpx.get(f"{self.url}{path}", headers=headers, timeout=30)

    # The story ---------------------------------------------------------------------------------
    def run(self) -> None:
        if self.root.exists():
            shutil.rmtree(self.root)
        (self.root / "model").mkdir(parents=True)
        (self.root / "model" / "config.json").write_text(json.dumps(MODEL, indent=2))

        say("refitd demo: a trainer pushes weights; refitd versions them, quantizes them to")
        say("blockwise FP8, checks them against bf16 logits, and switches both TP ranks at once.")

        step(1, f"Start refitd serve: embedded Redis, {TP_SIZE} local rank agents, on {self.url}")
        say(f"    model: a tiny Qwen3-style config ({self.root / 'model' / 'config.json'}):")
        say("    hidden 256, 2 layers, MLP width 640, so each TP-2 shard of the MLP is 320 wide")
        self.start_daemon()
        self.new_log("embedded redis-server pid")
        self.new_log("agent started")
        ready = httpx.get(f"{self.url}/readyz", timeout=5)
        say(
            f"    GET /healthz -> 200; GET /readyz -> {ready.status_code}: {ready.json()['reason']}"
        )

        base = synthetic.base_state(MODEL, seed=0)
        step(2, "The trainer pushes step 100 (verified, then committed on both ranks)")
        self.refitctl("push", str(_save(base, self.checkpoints / "step-100")), "--label",
                      "step-100", token=self.trainer_token)  # fmt: skip
        say("    The MLP does not fit 128x128 blocks at TP 2; refitd falls back and says why:")
        self.new_log("per-channel fallback")

        step(3, "The trainer pushes step 101, an ordinary training step")
        good = synthetic.honest_update(base, seed=1)
        self.refitctl("push", str(_save(good, self.checkpoints / "step-101")), "--label",
                      "step-101", token=self.trainer_token)  # fmt: skip
        self.refitctl("show", "2", token=self.admin_token)

        step(
            4,
            "A corrupted push: step 102 holds a NaN. The pipeline's one pass over the data finds "
            "it on the device: the version is rejected, no rank changes",
        )
        corrupt = dict(good)
        w = corrupt["model.layers.1.mlp.down_proj.weight"].clone()
        w[7, 42] = float("nan")
        corrupt["model.layers.1.mlp.down_proj.weight"] = w
        self.refitctl("push", str(_save(corrupt, self.checkpoints / "step-102")), "--label",
                      "step-102", token=self.trainer_token, check=False)  # fmt: skip

        step(
            5, "A blown-up step 103 (huge outliers): FP8 cannot hold it, the logit gate rejects it"
        )
        hostile = synthetic.outlier_update(good, factor=1000.0)
        code = self.refitctl("push", str(_save(hostile, self.checkpoints / "step-103")),
                             "--label", "step-103", token=self.trainer_token,
                             check=False)  # fmt: skip
        if code == 0:
            say("    (the gate let it through this time: see docs/verification-notes.md)")

        step(6, "The operator rolls every rank back to the previous good version")
        self.refitctl("rollback", token=self.admin_token)

        step(7, "Where things stand")
        self.refitctl("versions", token=self.admin_token)
        say("")
        self.refitctl("status", token=self.admin_token)

        step(8, "Stop refitd: rank agents and the embedded Redis go with it")
        self.stop_daemon()
        self.new_log("stopped")
        say(f"\nDone. Logs and artifacts are in {self.root}; `make demo` starts afresh.")


def main() -> None:
    demo = Demo()
    try:
        demo.run()
    finally:
        demo.stop_daemon()


if __name__ == "__main__":
    main()
