"""Our task groups resolve in lm-eval's TaskManager; the answer extraction and document mapping are right;
the local-data tasks (StoryCloze CSVs, MAWPS, TabMWP, tiny_offline) run end to end on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

TASKS_DIR = Path(__file__).resolve().parents[2] / "tad_torchtune" / "eval" / "tasks"
COMMONSENSE8 = ["hellaswag", "winogrande", "openbookqa", "arc_easy", "arc_challenge", "piqa", "social_iqa"]
MATH8 = ["gsm8k_cot_tad", "minerva_math", "svamp_cot_tad", "asdiv_cot_tad", "mawps_cot_tad", "tabmwp_cot_tad"]
MATH8 += ["mathqa_cot_tad", "sat_math_cot_tad"]


@pytest.fixture(scope="module")
def tm_defaults():
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=True)


def test_groups_resolve_in_taskmanager(tm_defaults):
    from lm_eval.tasks._index import Kind
    from lm_eval.tasks._yaml_loader import load_yaml

    idx = tm_defaults.task_index
    cs = idx["commonsense8"]
    assert cs.kind == Kind.GROUP
    members = [t["task"] for t in cs.cfg["task"]]
    assert members == COMMONSENSE8 + ["storycloze_2016_tad"]
    assert all(t["num_fewshot"] == 5 for t in cs.cfg["task"])
    m8 = idx["math8"]
    assert m8.kind == Kind.GROUP and m8.cfg["task"] == MATH8
    for name in members + MATH8:
        assert name in idx, f"{name} is not known to lm-eval's TaskManager"
    # every one of our task YAMLs loads with its !function references resolved to real callables
    for name in ["storycloze_2016_tad"] + [t for t in MATH8 if t != "minerva_math"]:
        cfg = load_yaml(idx[name].yaml_path, resolve_func=True)
        assert cfg["task"] == name
        for key in ("process_results", "process_docs", "custom_dataset"):
            if key in cfg:
                assert callable(cfg[key]), (name, key)
        if cfg.get("include"):
            base = load_yaml(idx[name].yaml_path.parent / cfg["include"], resolve_func=True)
            assert base["num_fewshot"] == 8 and len(base["fewshot_config"]["samples"]) == 8
            assert all("The answer is" in s["target"] for s in base["fewshot_config"]["samples"])


def test_answer_extraction():
    from tad_torchtune.eval.tasks.math8 import utils as u

    assert u.extract_number("So 5 * 4 = 20 computers. 9 + 20 is 29. The answer is 29.") == "29"
    assert u.extract_number("The answer is $1,250.50 in total") == "1,250.50"
    assert u.extract_number("no marker: 3 then 7") == "7"
    assert u.extract_number("nothing") is None
    assert u.numbers_match("1,250.50", "1250.5") and u.numbers_match("8.0", "8") and not u.numbers_match("7", "8")
    assert u.numbers_match("3/4", "0.75")
    assert u.process_numeric({"answer": "18"}, ["She earns 9 * 2 = 18. The answer is 18.\n"]) == {"exact_match": 1.0}
    assert u.process_numeric({"answer": "yes"}, ["... The answer is yes."]) == {"exact_match": 1.0}
    assert u.extract_choice("b ) is wrong. The answer is (C).") == "C"
    assert u.extract_choice("I pick D") == "D"
    assert u.process_choice({"answer": "B", "letters": "ABCD"}, ["Let's see... the answer is B"]) == {
        "exact_match": 1.0
    }


def test_document_mapping():
    import datasets

    from tad_torchtune.eval.tasks.math8 import utils as u

    gsm = u.gsm8k_docs(datasets.Dataset.from_list([{"question": "q?", "answer": "1 + 1 = 2\n#### 2"}]))
    assert gsm[0]["answer"] == "2"
    sv = u.svamp_docs(
        datasets.Dataset.from_list([{"Body": "Ann has 3 apples.", "Question": "How many?", "Answer": 3.0}])
    )
    assert sv[0]["question"] == "Ann has 3 apples. How many?" and u.numbers_match(sv[0]["answer"], "3")
    asd = u.asdiv_docs(
        datasets.Dataset.from_list(
            [
                {"body": "B.", "question": "Q?", "answer": "9 (apples)"},
                {"body": "B.", "question": "Q?", "answer": "1;2"},
            ]
        )
    )
    assert len(asd) == 1 and asd[0]["answer"] == "9"
    mq = u.mathqa_docs(
        datasets.Dataset.from_list(
            [
                {
                    "Problem": "what is 2 + 2 ?",
                    "Rationale": '"explanation : 2 + 2 = 4 answer : b"',
                    "options": "a ) 3 , b ) 4 , c ) 5 , d ) 6 , e ) 7",
                    "correct": "b",
                }
            ]
        )
    )
    assert mq[0]["question"].endswith("Answer Choices: (A) 3 (B) 4 (C) 5 (D) 6 (E) 7")
    assert mq[0]["answer"] == "B" and mq[0]["target"].endswith("The answer is (B).")
    sat = u.sat_math_docs(
        datasets.Dataset.from_list(
            [
                {
                    "query": "Q: 1+1=? Answer Choices: (A)1 (B)2 (C)3 (D)4\nA: Among A through D, the answer is",
                    "gold": [1],
                }
            ]
        )
    )
    assert sat[0]["question"] == "1+1=? Answer Choices: (A)1 (B)2 (C)3 (D)4" and sat[0]["answer"] == "B"


def _local_math_data(root: Path) -> Path:
    (root / "mawps").mkdir(parents=True)
    for i, sub in enumerate(["singleeq", "singleop", "addsub", "multiarith"]):
        rows = [{"input": f"Tom has {i} apples and gets {j} more. How many?", "target": i + j} for j in range(2)]
        (root / "mawps" / f"{sub}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "tabmwp").mkdir()
    tab = {
        str(i): {"question": f"How many {i}?", "table": "a | b\n1 | 2", "table_title": "T", "answer": str(i)}
        for i in range(5)
    }
    tab["x"] = {"question": "Is it?", "table": "a | b", "table_title": None, "answer": "yes", "choices": ["yes", "no"]}
    (root / "tabmwp" / "tabmwp_test.json").write_text(json.dumps(tab))
    sc = root / "storycloze"
    sc.mkdir()
    head = "InputStoryid,InputSentence1,InputSentence2,InputSentence3,InputSentence4,"
    head += "RandomFifthSentenceQuiz1,RandomFifthSentenceQuiz2,AnswerRightEnding\n"
    rows = "".join(
        f"id{i},Ann woke up.,She was hungry.,She cooked.,It smelled good.,She ate.,She flew.,1\n" for i in range(4)
    )
    (sc / "cloze_test_val__spring2016 - cloze_test_ALL_val.csv").write_text(head + rows)
    (sc / "cloze_test_test__spring2016 - cloze_test_ALL_test.csv").write_text(head + rows)
    return root


@pytest.mark.integration_test
def test_local_data_tasks_run_end_to_end(tiny_hf_dir, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from tad_torchtune.eval.lm import TorchtuneLM
    from tests.eval.conftest import load_torchtune

    data = _local_math_data(tmp_path)
    tm = TaskManager(
        include_path=str(TASKS_DIR),
        include_defaults=False,
        metadata={"storycloze_dir": str(data / "storycloze"), "math_data_dir": str(data)},
    )
    model, tok = load_torchtune(tiny_hf_dir)
    lm = TorchtuneLM(model, tok, batch_size=8, max_seq_len=512, max_gen_toks=8)
    out = simple_evaluate(
        model=lm,
        tasks=["storycloze_2016_tad", "mawps_cot_tad", "tabmwp_cot_tad"],
        num_fewshot=1,
        limit=3,
        task_manager=tm,
        gen_kwargs="max_gen_toks=8",
        log_samples=True,
        verbosity="ERROR",
    )
    res = out["results"]
    assert len(out["samples"]["storycloze_2016_tad"]) == 3
    assert len(out["samples"]["mawps_cot_tad"]) == 3 and len(out["samples"]["tabmwp_cot_tad"]) == 3
    # StoryCloze: two choices per story, few-shot context drawn from the validation CSV
    s0 = out["samples"]["storycloze_2016_tad"][0]
    assert len(s0["resps"]) == 2 and s0["arguments"][0][0].count("Ann woke up.") == 2
    # the CoT prompt starts with the first GSM8K worked example
    prompt = out["samples"]["mawps_cot_tad"][0]["arguments"][0][0]
    assert prompt.startswith("Question: There are 15 trees") and prompt.endswith("How many?\nAnswer:")
    for task in ["storycloze_2016_tad", "mawps_cot_tad", "tabmwp_cot_tad"]:
        metric = "acc,none" if task == "storycloze_2016_tad" else "exact_match,none"
        assert 0.0 <= res[task][metric] <= 1.0, (task, res[task])
    # the gold answers were mapped from the files' own field names
    assert [s["target"] for s in sorted(out["samples"]["mawps_cot_tad"], key=lambda s: s["doc_id"])] == ["0", "1", "1"]

    with pytest.raises(ValueError, match="storycloze_dir"):
        from tad_torchtune.eval.tasks.commonsense8.utils import load_storycloze

        load_storycloze(None)
