"""Starting vLLM for the paper run: the `vllm serve` command with the paper run's flags, and the
checks before it. The process itself (its own process group, its log in a file, ready when
/health answers, stopped when the run ends) is codestop's launcher,
``codestop.engines.server.launch``, the one the tests start their vLLM with.

Checked before anything starts, each with one message saying what to do: vLLM is installed (the
`vllm` command, or the one ``--vllm-command`` names), and the machine has a GPU (``nvidia-smi`` or
``rocm-smi`` lists one). ``--base-url`` skips all of it and uses a server already running.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

from codestop.engines.server.launch import vllm_serve_command
from codestop.errors import CodestopError

# room in the context for the prompt, a probe and the forced answer beyond the reasoning budget
PROMPT_ALLOWANCE = 2048


def serve_command(
    vllm: str, model: str, *, port: int, max_model_len: int, gpu_memory_utilization: float, stream_interval: int,
    extra: str = "",
) -> list[str]:
    """The `vllm serve` command line. Prefix caching: each probe and step resends the question's
    prefix. ``--stream-interval``: several tokens per server-sent event, so the client reads the
    stream with a fraction of the CPU (docs/serving.md). ``max_model_len``: the reasoning budget plus
    :data:`PROMPT_ALLOWANCE`, so a trace is never cut by the context before the budget."""
    return vllm_serve_command(vllm, model, port=port, max_model_len=max_model_len, args=[
        "--gpu-memory-utilization", str(gpu_memory_utilization), "--stream-interval", str(stream_interval), *shlex.split(extra)])


def check_vllm(vllm: str) -> None:
    """vLLM must be installed: the command's program found on PATH (or a path that exists)."""
    program = shlex.split(vllm)[0] if vllm.strip() else ""
    if not program or (shutil.which(program) is None and not Path(program).is_file()):
        raise CodestopError(
            f"vllm: {program or vllm!r} not found: vLLM is not installed here. Install it on the GPU machine "
            "(`pip install vllm`), name its command with --vllm-command, or pass --base-url to a vLLM already running"
        )


def gpus() -> list[str]:
    """The GPUs the NVIDIA or AMD tools list (empty when neither is there or both list none)."""
    for tool, args in (("nvidia-smi", ["-L"]), ("rocm-smi", ["--showproductname"])):
        if shutil.which(tool) is None:
            continue
        try:
            done = subprocess.run([tool, *args], capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired):
            continue
        found = [line.strip() for line in done.stdout.splitlines() if line.strip().startswith(("GPU", "Card series", "card"))]
        if done.returncode == 0 and found:
            return found
    return []


def check_gpu() -> list[str]:
    found = gpus()
    if not found:
        raise CodestopError(
            "gpu: no GPU found (neither nvidia-smi nor rocm-smi lists one); this run starts vLLM on a GPU. "
            "Run it on a GPU machine, or pass --base-url to a vLLM server running elsewhere"
        )
    return found
