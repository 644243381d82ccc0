"""Document mapping, data loaders and answer extraction for the math8 tasks (lm-eval ``!function`` targets).

Answer extraction (stated in math8.yaml): the text after the last "The answer is" (else the whole generation);
numeric tasks take the first number in it (else the last number of the generation) and compare numerically with
tolerance 1e-4 * max(1, |gold|); choice tasks take the first option letter in it.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

_NUM = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_ANSWER_IS = re.compile(r"answer is[:\s]*(.*)", re.IGNORECASE | re.DOTALL)


def _to_float(s: str) -> float | None:
    s = s.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        if "/" in s:
            num, den = s.split("/", 1)
            return float(num) / float(den)
        return float(s)
    except (ValueError, ZeroDivisionError):
        return None


def extract_number(text: str) -> str | None:
    """The predicted number: the first number after the last "The answer is", else the last number in ``text``."""
    tail = _ANSWER_IS.findall(text)
    if tail:
        m = _NUM.search(tail[-1])
        if m:
            return m.group(0)
    nums = _NUM.findall(text)
    return nums[-1] if nums else None


def numbers_match(pred: str | None, gold: str) -> bool:
    """True when both parse as numbers within 1e-4 * max(1, |gold|), or the strings agree case-insensitively."""
    if pred is None:
        return False
    p, g = _to_float(pred), _to_float(str(gold))
    if p is not None and g is not None:
        return abs(p - g) <= 1e-4 * max(1.0, abs(g))
    return pred.strip().lower().rstrip(".") == str(gold).strip().lower().rstrip(".")


def process_numeric(doc: dict, results: list[str]) -> dict[str, float]:
    """lm-eval ``process_results`` for numeric answers (GSM8K, SVAMP, ASDiv, MAWPS, TabMWP)."""
    gen = results[0]
    gold = str(doc["answer"])
    if _to_float(gold) is None:  # TabMWP has text answers ("yes", a name, ...): compare the stated answer text
        tail = _ANSWER_IS.findall(gen)
        pred = tail[-1].strip().split("\n")[0] if tail else gen.strip().split("\n")[-1]
        return {"exact_match": float(numbers_match(pred, gold))}
    return {"exact_match": float(numbers_match(extract_number(gen), gold))}


def extract_choice(text: str, letters: str = "ABCDE") -> str | None:
    """The predicted option letter: first letter after the last "answer is", else the last standalone letter."""
    pat = re.compile(rf"\(?\b([{letters}{letters.lower()}])\b\)?")
    tail = _ANSWER_IS.findall(text)
    if tail:
        m = pat.search(tail[-1])
        if m:
            return m.group(1).upper()
    found = pat.findall(text)
    return found[-1].upper() if found else None


def process_choice(doc: dict, results: list[str]) -> dict[str, float]:
    """lm-eval ``process_results`` for option-letter answers (MathQA, SAT-math)."""
    return {"exact_match": float(extract_choice(results[0], doc.get("letters", "ABCDE")) == doc["answer"])}


# ------------------------------------------------------------------------------------------- doc mapping
def gsm8k_docs(dataset):
    return dataset.map(lambda d: {"question": d["question"], "answer": d["answer"].split("####")[-1].strip()})


def svamp_docs(dataset):
    def fn(d):
        body, q = d.get("Body", ""), d.get("Question", "")
        return {"question": f"{body.strip()} {q.strip()}".strip(), "answer": str(d["Answer"])}

    return dataset.map(fn)


def asdiv_docs(dataset):
    dataset = dataset.filter(lambda d: ";" not in d["answer"])

    def fn(d):
        m = _NUM.search(d["answer"])
        return {"question": f"{d['body'].strip()} {d['question'].strip()}", "answer": m.group(0) if m else d["answer"]}

    return dataset.map(fn)


def mathqa_docs(dataset):
    def fn(d):
        options = re.sub(r"\b([a-e]) \)", lambda m: f"({m.group(1).upper()})", d["options"]).replace(" , ", " ")
        rationale = d["Rationale"].strip().strip('"').replace("\\n", " ")
        answer = d["correct"].strip().upper()
        return {
            "question": f"{d['Problem'].strip()}\nAnswer Choices: {options}",
            "answer": answer,
            "target": f"{rationale} The answer is ({answer}).",
            "letters": "ABCDE",
        }

    return dataset.map(fn)


def sat_math_docs(dataset):
    def fn(d):
        q = re.sub(r"^Q:\s*", "", d["query"].strip())
        q = re.sub(r"\s*A: Among A through [A-E], the answer is\s*$", "", q)
        return {"question": q, "answer": "ABCD"[int(d["gold"][0])], "letters": "ABCD"}

    return dataset.map(fn)


# ------------------------------------------------------------------------------------------- local data
def _math_dir(math_data_dir: str | None, name: str) -> Path:
    folder = math_data_dir or os.environ.get("TAD_MATH_DATA_DIR")
    if not folder:
        raise ValueError(
            f"{name} reads local files: set `math_data_dir: /path` in the eval config (TaskManager metadata) or the "
            f"environment variable TAD_MATH_DATA_DIR; the layout is math-evaluation-harness's data/ folder"
        )
    return Path(folder).expanduser() / name


def _first(d: dict, keys: tuple[str, ...], what: str):
    for k in keys:
        if k in d and d[k] not in (None, ""):
            return d[k]
    raise KeyError(f"no {what} field among {keys} in a row with keys {sorted(d)}")


def load_mawps(math_data_dir: str | None = None, **kwargs):
    """MAWPS: the four sub-sets singleeq, singleop, addsub, multiarith (``<dir>/mawps/<name>.jsonl``)."""
    import datasets

    folder, rows = _math_dir(math_data_dir, "mawps"), []
    for sub in ("singleeq", "singleop", "addsub", "multiarith"):
        path = folder / f"{sub}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"MAWPS file {path} is missing")
        for line in path.read_text().splitlines():
            if line.strip():
                d = json.loads(line)
                q = _first(d, ("question", "input", "sQuestion", "Question"), "question")
                a = _first(d, ("answer", "target", "lSolutions", "Answer"), "answer")
                a = a[0] if isinstance(a, list) else a
                rows.append({"question": str(q), "answer": str(a), "type": sub})
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def load_tabmwp(math_data_dir: str | None = None, n: int = 1000, seed: int = 0, **kwargs):
    """TabMWP: ``<dir>/tabmwp/tabmwp_test.json`` (the official release), ``n`` problems sampled with ``seed``."""
    import datasets

    path = _math_dir(math_data_dir, "tabmwp") / "tabmwp_test.json"
    if not path.is_file():
        raise FileNotFoundError(f"TabMWP file {path} is missing")
    items = list(json.loads(path.read_text()).values())
    if len(items) > n:
        items = random.Random(seed).sample(items, n)
    rows = []
    for d in items:
        title = d.get("table_title")
        head = f'Read the following table regarding "{title}"' if title else "Read the following table"
        q = f"{head} and then answer a question.\n\n{d['table']}\n\n{d['question']}"
        if d.get("choices"):
            q += " Choices: " + ", ".join(str(c) for c in d["choices"])
        rows.append({"question": q, "answer": str(d["answer"])})
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def load_svamp(**kwargs):
    """SVAMP from the hub (ChilleD/SVAMP), train and test together as math-evaluation-harness evaluates it."""
    import datasets

    both = datasets.load_dataset("ChilleD/SVAMP")
    return datasets.DatasetDict({"test": datasets.concatenate_datasets([both["train"], both["test"]])})
