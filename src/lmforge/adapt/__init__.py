"""Adaptation: chat templates, SFT, DPO and RLVR on the one trainer (the Tülu 3 / OLMo 2 Instruct recipe).

- `templates`: chat templates (tulu, chatml, the tokenizer's own), token ids and the mask of trained tokens;
- `data`: the record formats (JSONL), reading them with bad records counted, rows for the trainer;
- `builders`: datasets made offline from what is installed (`lmforge adapt data ...`);
- `config`: `AdaptConfig`, which every stage's config extends, and `SFTConfig`, `DPOConfig`;
- `runner`: the start model (`load_policy`), the row loader, training, and the output model directory;
- `sft`, `dpo`: the stages' objectives (`lmforge.train.objective.Objective`) and entry points.
See docs/adapt.md.
"""
