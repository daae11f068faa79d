import pytest

from lmforge.core.errors import LmforgeError
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
