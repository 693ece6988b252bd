"""Fuzzing the readers of untrusted input (tests/fuzz_targets.py): safetensors files, torch zip
checkpoints, config values and prompt-cache files. Each target runs in a child process under a
time limit and 2 GiB of address space; only the project's own errors may escape, and every
example must end within seconds. The default run is a few seconds per target; `-m slow` runs
twenty times as many examples."""

import pytest
from bounded import run_bounded

TARGETS = ["safetensors", "torch_zip", "config", "prompt_cache"]
EXAMPLES = 60


def fuzz(target: str, examples: int, timeout: float) -> None:
    p = run_bounded(
        f"import sys, fuzz_targets; sys.argv = ['', {target!r}]\n"
        f"fuzz_targets.TARGETS[{target!r}]({examples}); print('OK')",
        timeout=timeout,
    )
    assert p.returncode == 0 and p.stdout.strip().endswith("OK"), (p.stdout + p.stderr)[-4000:]


@pytest.mark.parametrize("target", TARGETS)
def test_fuzz(target):
    fuzz(target, EXAMPLES, timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_long(target):
    fuzz(target, 20 * EXAMPLES, timeout=1200)
