"""Any fastText classifier as a tagger: a DCLM-style quality model, a toxicity model, lid.176...

    lmforge data tag --taggers fasttext --tagger-option fasttext.model=quality.bin \
        --tagger-option fasttext.level=paragraph --tagger-option fasttext.k=2

Emits `fasttext__<label>` spans (the document, or each non-blank line at paragraph level) scored with the
label's probability, for the top-k labels.
"""

from __future__ import annotations

from lmforge.curation.taggers import Tagger, register_tagger
from lmforge.curation.taggers.language import load_fasttext, paragraph_spans, predict
from lmforge.core.errors import LmforgeError


@register_tagger("fasttext")
class FastTextClassifierTagger(Tagger):
    attributes = ("*",)

    def __init__(self, model: str = "", level: str = "doc", k: str | int = 2):
        if not model:
            raise LmforgeError("the fasttext tagger needs a model: its option model=PATH.bin "
                               "(--tagger-option fasttext.model=PATH.bin)")
        if level not in ("doc", "paragraph"):
            raise LmforgeError(f"fasttext.level must be 'doc' or 'paragraph', got {level!r}")
        try:
            self.k = int(k)
        except ValueError:
            raise LmforgeError(f"fasttext.k must be an integer, got {k!r}") from None
        self.model = load_fasttext(model)
        self.level = level

    def tag(self, doc: dict) -> dict:
        text = doc["text"]
        out: dict[str, list] = {}
        units = [(0, len(text), text)] if self.level == "doc" else paragraph_spans(text)
        for start, end, unit in units:
            for label, score in predict(self.model, unit, self.k):
                out.setdefault(label, []).append([start, end, score])
        return out
