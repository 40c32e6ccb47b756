"""Writes the Parquet test files from the repository's JSON, text and CSV samples with Hugging Face
`datasets` (the writer behind the Hub's Parquet files): `python tests/data/parquet/generate.py`
from the repository root. Dev tool; ember's tests read the files it wrote.
"""
import csv
import json
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

DATA = Path(__file__).resolve().parent.parent
OUT = DATA / "parquet"


def write(records, path, features=None, rows_a_group=64, compression="snappy"):
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset = datasets.Dataset.from_list(records, features=features)
    # Several row groups a file, as large files have.
    if compression == "snappy":  # datasets' own writer and codec
        dataset.to_parquet(str(path), batch_size=rows_a_group)
    else:
        pq.write_table(dataset.data.table, path, row_group_size=rows_a_group, compression=compression)


# Alpaca records, snappy (datasets' default codec), four row groups.
write(json.loads((DATA / "alpaca_en_sample_200.json").read_text()), OUT / "alpaca_en_sample_200.parquet")
# Mixed record formats in one table: each row's other formats' columns are null.
chat = [json.loads(line) for line in (DATA / "chat_sample.jsonl").read_text().splitlines() if line.strip()]
pq.write_table(pa.Table.from_struct_array(pa.array(chat)), OUT / "chat_sample.parquet", row_group_size=2)
# Plain text for continued pretraining, zstd, 50 rows a group.
lines = [line for line in (DATA / "zh_text_sample.txt").read_text().splitlines() if line.strip()]
write([{"text": line} for line in lines], OUT / "zh_text_sample.parquet", rows_a_group=50, compression="zstd")

# `cais/mmlu`'s layout: one table of every subject, `choices` a list, `answer` a class label.
mmlu = datasets.Features({
    "question": datasets.Value("string"),
    "subject": datasets.Value("string"),
    "choices": datasets.Sequence(datasets.Value("string")),
    "answer": datasets.ClassLabel(names=["A", "B", "C", "D"]),
})
for split in ["test", "dev"]:
    rows = []
    for file in sorted((DATA / "exam/en" / split).glob("*.csv")):
        subject = file.stem.rsplit("_", 1)[0]
        for question, a, b, c, d, answer in csv.reader(file.open(encoding="utf-8")):
            rows.append({"question": question, "subject": subject, "choices": [a, b, c, d], "answer": "ABCD".index(answer)})
    write(rows, DATA / f"exam/parquet/mmlu/{split}-00000-of-00001.parquet", features=mmlu)

# C-Eval's layout: a folder a subject, a file a split, letter answers.
for split in ["test", "dev"]:
    for file in sorted((DATA / "exam/zh" / split).glob("*.csv")):
        rows = [
            {"id": int(row[""]), "question": row["Question"], "A": row["A"], "B": row["B"], "C": row["C"], "D": row["D"], "answer": row["Answer"], "explanation": ""}
            for row in csv.DictReader(file.open(encoding="utf-8"))
        ]
        write(rows, DATA / f"exam/parquet/ceval/{file.stem}/{split}-00000-of-00001.parquet")

# A binary column that is not UTF-8 text: an error naming the record and the column.
pq.write_table(pa.table({"instruction": pa.array([b"ok", b"\xff\xfe"], pa.binary()), "output": ["a", "b"]}), OUT / "not_text.parquet")
