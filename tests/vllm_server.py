"""A real vLLM OpenAI-compatible server (CPU) for the remote-engine tests and benchmark.

vLLM lives in a virtual environment of its own (``.ci/install-vllm``): its Python is
``$STREAMER_VLLM_PYTHON``, else ``.venv-vllm/bin/python`` in the checkout.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON_ENV = "STREAMER_VLLM_PYTHON"
SERVED_NAME = "tiny-random"


def vllm_python() -> Path:
    return Path(os.environ.get(PYTHON_ENV) or ROOT / ".venv-vllm" / "bin" / "python")


def vllm_command(model_dir: Path, port: int, served_name: str = SERVED_NAME) -> list[str]:
    """The server as the README runs it: small KV cache and batch for a CPU, every frame of a
    JPEG video kept, cached prompt tokens reported."""
    return [
        str(vllm_python()),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        served_name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "bfloat16",
        "--max-model-len",
        "4096",
        "--enforce-eager",
        "--kv-cache-memory-bytes",
        str(256 * 2**20),
        "--block-size",
        "32",
        "--max-num-seqs",
        "8",
        "--enable-prompt-tokens-details",
        "--media-io-kwargs",
        json.dumps({"video": {"num_frames": -1}}),
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class VllmServer:
    model_dir: Path
    port: int
    log_path: Path
    proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, timeout: float = 300.0) -> VllmServer:
        """Start it and wait until it serves the model (about 30 s on a free machine)."""
        log = self.log_path.open("a")
        self.proc = subprocess.Popen(
            vllm_command(self.model_dir, self.port),
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,  # its engine process goes with it on kill()
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                with urllib.request.urlopen(self.base_url + "/models", timeout=2) as r:
                    if SERVED_NAME in r.read().decode():
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        self.kill()
        raise RuntimeError(f"vLLM did not serve within {timeout} s:\n{self.log()[-4000:]}")

    def pause(self) -> None:
        """Freeze the server and its engine (SIGSTOP): no more tokens, connections stay open."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGCONT)

    def kill(self) -> None:
        """Kill the server and its engine process at once (SIGKILL to its process group)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metric(self, name: str) -> float:
        """The sum of a Prometheus counter or gauge over its labels."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as r:
            lines = r.read().decode().splitlines()
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.split("{")[0].split(" ")[0] == name)
