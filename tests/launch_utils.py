"""Run a script under the DeepSpeed launcher (CPU ranks, gloo) as a subprocess with a timeout."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_launch(num_ranks: int, script: str, args: list[str], timeout: float = 300.0,
                     env: dict[str, str | None] | None = None) -> str:
    """``deepspeed --num_gpus N script args``; returns the combined output, raises with its tail on failure.
    ``env`` entries set (or, with value ``None``, remove) environment variables."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(num_ranks),
           "--master_port", str(free_port()), script, *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for k, v in (env or {}).items():
        if v is None:
            full_env.pop(k, None)
        else:
            full_env[k] = v
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        raise AssertionError(f"timed out after {timeout}s: {' '.join(cmd)}\n{out[-4000:]}") from e
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise AssertionError(f"exit code {proc.returncode}: {' '.join(cmd)}\n{out[-6000:]}")
    return out
