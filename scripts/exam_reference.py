"""The reference side of `ember exam` (a developer tool): LLaMA-Factory's own eval template and
`fewshot` chat template build each question's prompt, transformers scores it, and the logits of
"A"-"D" at the last position are written one JSON line a question, as `ember exam --answers`
writes them. The shots are the dev file's first rows (LLaMA-Factory draws them at random, with no
seed; ember takes the first ones, as the original MMLU harness does).

    pip download llamafactory --no-deps && unzip llamafactory-*.whl -d lf   # and: pip install datasets
    python scripts/exam_reference.py --llamafactory lf --model <dir> --test <dir> --dev <dir> \
        --shots 3 --lang en --out reference.jsonl

Optional packages LLaMA-Factory imports when loaded (torchaudio, …) are replaced by stand-ins.
"""

import argparse
import csv
import json
import sys
from pathlib import Path
from unittest import mock


def import_llamafactory(root):
    sys.path.insert(0, root)
    for _ in range(30):
        try:
            from llamafactory.data.template import TEMPLATES
            from llamafactory.eval.template import get_eval_template
            return TEMPLATES, get_eval_template
        except ModuleNotFoundError as missing:
            parts = missing.name.split(".")
            for i in range(1, len(parts) + 1):
                sys.modules.setdefault(".".join(parts[:i]), mock.MagicMock())
            for name in [m for m in sys.modules if m.startswith("llamafactory")]:
                del sys.modules[name]
    raise SystemExit("could not import llamafactory")


def rows(path):
    """Questions as dicts {question, A, B, C, D, answer}: MMLU's six columns, or a header naming them."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        table = [r for r in csv.reader(f) if r]
    header = {cell.strip().lower(): i for i, cell in enumerate(table[0])}
    keys = ["question", "a", "b", "c", "d", "answer"]
    if all(k in header for k in keys):
        columns, table = [header[k] for k in keys], table[1:]
    else:
        columns = list(range(6))
    return [dict(zip(["question", "A", "B", "C", "D", "answer"], (r[c] for c in columns))) for r in table]


def subject_key(path):
    stem = Path(path).stem
    for suffix in ("_test", "_val", "_dev"):
        if stem.endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--llamafactory", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--test", required=True)
    p.add_argument("--dev")
    p.add_argument("--shots", type=int, default=0)
    p.add_argument("--lang", default="en")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    templates, get_eval_template = import_llamafactory(a.llamafactory)
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(a.model)
    model = transformers.AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    template, eval_template = templates["fewshot"], get_eval_template(a.lang)
    choices = [tokenizer.encode(ch, add_special_tokens=False)[-1] for ch in "ABCD"]
    dev = {subject_key(f): f for f in sorted(Path(a.dev).glob("*.csv"))} if a.dev else {}
    mapping_file = next((f for f in [Path(a.test, *[".."] * up, "mapping.json") for up in range(3)] if f.is_file()), None)
    mapping = json.loads(mapping_file.read_text(encoding="utf-8")) if mapping_file else {}
    with open(a.out, "w", encoding="utf-8") as out:
        for test in sorted(Path(a.test).glob("*.csv")):
            key = subject_key(test)
            name = mapping.get(key, {}).get("name", key.replace("_", " "))
            support = rows(dev[key])[: a.shots] if a.shots else []
            for index, question in enumerate(rows(test)):
                messages = eval_template.format_example(target_data=question, support_set=support, subject_name=name)
                prompt, _ = template.encode_oneturn(tokenizer=tokenizer, messages=messages)
                with torch.no_grad():
                    logits = model(torch.tensor([prompt])).logits[0, -1, choices].tolist()
                pick = "ABCD"[max(range(4), key=lambda i: (logits[i], -i))]
                line = {"subject": key, "index": index, "prompt_tokens": len(prompt), "answer": question["answer"], "pick": pick, "logits": logits}
                out.write(json.dumps(line, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
