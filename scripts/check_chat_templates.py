"""ember's Jinja chat templates against transformers' (developer tool; needs transformers==5.23.0).

    python scripts/check_chat_templates.py TEMPLATES_DIR [RECORDS.jsonl ...] [--ember BIN] [--model DIR]

Renders every record of the records files (LLaMA-Factory's ShareGPT with `function_call` turns and
`tools`, or OpenAI messages with `tool_calls`; default tests/data/tool_calls.jsonl) with every
`*.jinja` template in TEMPLATES_DIR, once by transformers' `render_jinja_template` and once by
`ember data preview --json` with `data.template` the file, and counts per template: the same text
(or it with EOS after the last answer, where the template puts nothing after one), a different
text, both refusing, ember refusing (with its reason) and transformers refusing; and where ember
renders, whether its trained tokens are off: missing an answer's text or a call's name, or
holding a question's text that no answer repeats.
Special tokens are those of --model's tokenizer_config.json (default SmolLM2's fixture).
scripts/check-chat-templates.sh runs it on the templates llama.cpp keeps (models/templates).
"""
import argparse, collections, json, os, re, subprocess, sys, tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "fixtures"))
from generate_tool_calls import hf_messages  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from transformers.utils.chat_template_utils import render_jinja_template  # noqa: E402

RECIPE = """[model]
path = "{model}"
[adapter]
method = "lora"
[data]
path = "{data}"
template = "{template}"
cutoff_len = 1000000
val_size = 0
[output]
dir = "{out}"
"""


def ember_texts(ember, model, template, data, limit, work):
    """ember's previews (`text`, `input_ids`, `labels`) of the records in `data`, or None and its error line."""
    recipe = os.path.join(work, "recipe.toml")
    with open(recipe, "w") as f:
        f.write(RECIPE.format(model=model, data=data, template=template, out=os.path.join(work, "out")))
    p = subprocess.run([ember, "data", "preview", "--json", "--limit", str(limit), recipe], capture_output=True, text=True)
    if p.returncode != 0:
        return None, (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]
    return [json.loads(line) for line in p.stdout.splitlines()], None


def spans_off(tokenizer, preview, messages):
    """Whether the trained tokens miss an answer's text or a call's name, or hold a question's
    text that no answer repeats: the runs of tokens with loss, decoded."""
    runs, run = [], []
    for token, label in zip(preview["input_ids"], preview["labels"]):
        if label != -100:
            run.append(token)
        elif run:
            runs.append(run)
            run = []
    trained = "\0".join(tokenizer.decode(r, skip_special_tokens=False) for r in runs + [run] if r)
    answers = [m for m in messages if m["role"] == "assistant"]
    for m in messages:
        text = (m.get("content") or "").strip()
        if m["role"] == "assistant":
            if text and text not in trained or any(c["function"]["name"] not in trained for c in m.get("tool_calls", [])):
                return True
        elif len(text) >= 4 and text in trained and not any(text in (a.get("content") or "") for a in answers):
            return True
    return False


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("templates")
    parser.add_argument("records", nargs="*", default=[os.path.join(HERE, "..", "tests", "data", "tool_calls.jsonl")])
    parser.add_argument("--ember", default=os.path.join(HERE, "..", "target", "release", "ember"))
    parser.add_argument("--model", default=os.path.join(HERE, "..", "tests", "fixtures", "chat_template", "smollm2"))
    args = parser.parse_args()
    model = os.path.abspath(args.model)
    config = json.load(open(os.path.join(model, "tokenizer_config.json"), encoding="utf-8"))
    specials = {k: config[k] if isinstance(config[k], str) else config[k]["content"] for k in ["bos_token", "eos_token", "unk_token", "pad_token"] if config.get(k)}
    tokenizer = Tokenizer.from_file(os.path.join(model, "tokenizer.json"))
    records = [json.loads(line) for path in args.records for line in open(path, encoding="utf-8") if line.strip()]
    work = tempfile.mkdtemp(prefix="ember-chat-templates-")
    all_records = os.path.join(work, "all.jsonl")
    with open(all_records, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    totals, reasons = collections.Counter(), collections.Counter()
    for name in sorted(n for n in os.listdir(args.templates) if n.endswith(".jinja")):
        path = os.path.abspath(os.path.join(args.templates, name))
        source = open(path, encoding="utf-8").read()
        reference = []
        for record in records:
            messages, tools = hf_messages(record)
            try:
                reference.append(render_jinja_template(conversations=[messages], tools=tools or None, chat_template=source, **specials)[0][0])
            except Exception:  # the template's own raise_exception, or a Jinja error
                reference.append(None)
        texts, _ = ember_texts(args.ember, model, path, all_records, len(records), work)
        if texts is None:  # one record refused: each on its own
            texts = []
            for i, record in enumerate(records):
                one = os.path.join(work, "one.jsonl")
                with open(one, "w", encoding="utf-8") as f:
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
                preview, error = ember_texts(args.ember, model, path, one, 1, work)
                texts.append(preview[0] if preview else ("error", error))
        counts = collections.Counter()
        for record, ref, got in zip(records, reference, texts):
            refused = isinstance(got, tuple)
            if not refused:
                counts["trained spans off"] += spans_off(tokenizer, got, hf_messages(record)[0])
                got = got["text"]
            if ref is None:
                counts["both refuse" if refused else "transformers refuses"] += 1
            elif refused:
                counts["ember refuses"] += 1
                reason = re.search(r"does not render (the tools|tool calls|message)|unknown [a-z]+|invalid operation[^(]*", got[1])
                reasons[reason.group(0) if reason else got[1][-100:]] += 1
            elif ref == got:
                counts["same"] += 1
            else:
                # A template with nothing after an answer gets EOS after the last (GLM's).
                counts["same, EOS after the last answer" if got == ref + specials["eos_token"] else "differ"] += 1
        totals.update(counts)
        print(f"{name[:-6]}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())), flush=True)
    print(f"templates {len([n for n in os.listdir(args.templates) if n.endswith('.jinja')])} x records {len(records)}: " + ", ".join(f"{k} {v}" for k, v in sorted(totals.items())))
    if reasons:
        print("ember refuses because the template " + "; ".join(f"{k}: {v}" for k, v in reasons.most_common()))


if __name__ == "__main__":
    main()
