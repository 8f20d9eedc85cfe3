"""Tests for eval.py: estimators against hand computation and brute force, graders on crafted strings, CLI runs."""

import itertools, json, math, os, time

import pytest

import eval as ev
from test_empg import DATA, read_jsonl, run_cli, tiny_model


def test_pass_at_k_by_hand_and_brute_force():
    assert ev.pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert ev.pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 − C(3,2)/C(5,2)
    assert ev.pass_at_k(4, 0, 2) == 0 and ev.pass_at_k(4, 3, 2) == 1
    for n in range(1, 7):
        for c in range(n + 1):
            for k in range(
                1, n + 1
            ):  # the fraction of k-subsets holding at least one correct sample
                subsets = list(itertools.combinations([1] * c + [0] * (n - c), k))
                assert ev.pass_at_k(n, c, k) == pytest.approx(
                    sum(any(s) for s in subsets) / len(subsets)
                )


def test_majority_vote_equivalence_and_ties():
    assert ev.majority_vote(["3", "4", "3", "4"]) == "3"  # tie → the answer seen first
    assert ev.majority_vote(["4", "3", "3", "4"]) == "4"
    assert (
        ev.majority_vote(["7", "0.5", "\\frac{1}{2}", "7", "\\dfrac12"]) == "0.5"
    )  # 3 equivalent beat 2
    assert ev.majority_vote([None, "2", None]) == "2" and ev.majority_vote([None]) is None


def test_gsm8k_strict_vs_lenient():
    g = ev.grade("So she has \\boxed{18} eggs.", "#### 18", "gsm8k")
    assert (
        g["correct"] is False and g["lenient"] is True and g["extracted"] is None
    )  # strict: no '#### n'
    g = ev.grade("... #### 18", "18", "gsm8k")
    assert g["correct"] and g["lenient"]
    g = ev.grade("The total is 18 dollars, not 19.", "18", "gsm8k")
    assert not g["correct"] and not g["lenient"]  # lenient takes the last number: 19


@pytest.mark.parametrize(
    "pred,ref,ok",
    [
        ("\\frac{1}{2}", "0.5", True),
        ("\\dfrac12", "\\frac{1}{2}", True),
        ("0.5", "\\dfrac{1}{2}", True),
        ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}", True),
        ("(1,2]", "(1, 2]", True),
        ("(1,2)", "(1,2]", False),
        ("x = 3", "3", True),
        ("3", "4", False),
        ("\\frac{1}{3}", "0.5", False),
    ],
)
def test_math_equivalences(pred, ref, ok):
    assert ev.grade(f"The answer is \\boxed{{{pred}}}.", ref, "math")["correct"] is ok


def test_marker_counting():
    text = "First, add. Wait, that is wrong. Let me check: verify again. Alternatively, working backwards... waiting"
    m = ev.count_markers(text)
    # "let me check" + "verify" = 2; "wait" (not "waiting") + "alternatively" = 2; "first," = 1; "working backwards" = 1
    assert m == {
        "self_verification": 2,
        "backtracking": 2,
        "subgoal_setting": 1,
        "backward_chaining": 1,
    }


def test_grade_file(tmp_path):
    rows = [
        {"completion": "#### 5", "answer": "5"},
        {"completion": "\\boxed{5}", "answer": "5"},
        {"completion": "#### 4", "answer": "5"},
        {"completion": "nothing", "answer": "5"},
    ]
    f = tmp_path / "c.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = str(tmp_path / "o")
    s = ev.main(["--grade", str(f), "--task", "gsm8k", "--output-dir", out])[str(f)]
    assert s["accuracy"] == 0.25 and s["lenient_accuracy"] == 0.5 and s["problems"] == 4
    assert len(read_jsonl(os.path.join(out, "results.jsonl"))) == 4
    # k completions per row: pass@k and maj@k
    f.write_text(
        json.dumps({"completions": ["\\boxed{1}", "\\boxed{2}", "\\boxed{2}"], "answer": "2"})
        + "\n"
        + json.dumps({"completions": ["\\boxed{1}", "\\boxed{1}", "\\boxed{3}"], "answer": "3"})
        + "\n"
    )
    s = ev.main(["--grade", str(f), "--task", "math", "--output-dir", out])[str(f)]
    assert s["pass@3"] == 1.0 and s["maj@3"] == 0.5 and s["accuracy"] == pytest.approx(3 / 6)
    assert s["pass@3_se"] == 0 and s["maj@3_se"] == pytest.approx(
        0.5
    )  # sqrt(0.5 / 2): s² = 0.5, n = 2


def two_models_and_problems(tmp_path, a, b, n):
    """Two different tiny models at tmp_path/a and tmp_path/b, and n problems "d+1" → d + 1."""
    a, b = str(tmp_path / a), str(tmp_path / b)
    tiny_model(a, std=0.3), tiny_model(b, std=0.3, seed=1)
    data = tmp_path / "p.jsonl"
    data.write_text(
        "".join(json.dumps({"question": f"{d}+1", "answer": str(d + 1)}) + "\n" for d in range(n))
    )
    return a, b, data


def test_cli_on_tiny_models_writes_results(tmp_path):
    a, b, data = two_models_and_problems(tmp_path, "a", "b", 5)
    out = str(tmp_path / "o")
    r = run_cli(
        "--model",
        a,
        "--model",
        b,
        "--dataset",
        str(data),
        "--max-new-tokens",
        "4",
        "--batch-size",
        "2",
        "--num-samples",
        "3",
        "--temperature",
        "1.0",
        "--output-dir",
        out,
        script="eval.py",
    )
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(summary) == {a, b} and "pass@3" in summary[a] and "maj@3" in summary[a]
    res = read_jsonl(os.path.join(out, "a", "results.jsonl"))
    assert len(res) == 5 and all(len(x["completions"]) == 3 and len(x["lengths"]) == 3 for x in res)
    assert all(1 <= n <= 4 for x in res for n in x["lengths"])
    acc = sum(c for x in res for c in x["correct"]) / 15
    assert summary[a]["accuracy"] == pytest.approx(acc)
    assert json.load(open(os.path.join(out, "summary.json"))) == summary
    # greedy (the default) on the real GSM8K test layout
    r = run_cli(
        "--model",
        a,
        "--dataset",
        "gsm8k",
        "--data-dir",
        DATA,
        "--limit",
        "3",
        "--max-new-tokens",
        "3",
        "--output-dir",
        out,
        script="eval.py",
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])[a]["problems"] == 3


def bad(argv, capsys):
    with pytest.raises(SystemExit) as e:
        ev.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_bad_inputs(tmp_path, capsys):
    out = ["--output-dir", str(tmp_path / "o")]
    assert "cannot load model" in bad(
        ["--model", str(tmp_path / "x"), "--dataset", "gsm8k", "--data-dir", DATA, *out], capsys
    )
    assert "unknown dataset" in bad(["--model", "m", "--dataset", "nope", *out], capsys)
    assert "num-samples" in bad(["--model", "m", "--num-samples", "0", *out], capsys)
    assert "temperature" in bad(["--model", "m", "--num-samples", "4", *out], capsys)
    (tmp_path / "g.jsonl").write_text('{"completion": "1"}\n')
    assert "needs 'completion'" in bad(["--grade", str(tmp_path / "g.jsonl"), *out], capsys)
    (tmp_path / "h.jsonl").write_text('{"completion": "1", "answer": 1}\nnot json\n')
    assert "h.jsonl:2" in bad(["--grade", str(tmp_path / "h.jsonl"), *out], capsys)


def test_maj_at_k_votes_by_the_rule_accuracy_uses():
    # GSM8K: strict '#### n' answers. The boxed answers are right by the lenient rule only, so neither
    # pass@3 nor maj@3 credits them (before: pass@3 0.000 next to maj@3 1.000)
    r = ev.score_problem("q", "#### 18", ["\\boxed{18}", "\\boxed{18}", "#### 17"], "gsm8k")
    assert r["pass_at_k"] == 0 and r["maj_correct"] is False and r["maj_answer"] == "17"
    r = ev.score_problem("q", "#### 1,234", ["#### 1,234", "#### 1234", "#### 5"], "gsm8k")
    assert r["pass_at_k"] == 1 and r["maj_correct"] is True and r["maj_answer"] == "1234"


def test_maj_at_k_parses_each_answer_once_and_keeps_to_its_budget(monkeypatch):
    import math_verify

    calls = []
    real = math_verify.parse
    monkeypatch.setattr(math_verify, "parse", lambda *a, **k: calls.append(a) or real(*a, **k))
    ev.empg.parse_answer.cache_clear()
    answers = [f"\\frac{{{i}}}{{{i + 7}}}" for i in range(8)]  # 8 different answers: 28 comparisons
    assert ev.majority_vote(answers) == answers[0]
    assert len(calls) == 8  # one parse per distinct answer, not two per comparison
    slow = lambda a, b: time.sleep(0.05) or False
    t = time.time()
    assert (
        ev.majority_vote(answers * 3, same=slow, budget_s=0.2) == answers[0]
    )  # exact strings still group
    assert time.time() - t < 2  # 28+ slow comparisons would take > 1.4 s; the budget stops them


def test_labels_tell_same_named_checkpoints_apart(tmp_path):
    a, b = "runs/m-gsm8k-empg/checkpoint-000225", "runs/m-gsm8k-grpo/checkpoint-000225"
    assert ev.labels([a, b, "Qwen/Qwen2.5-1.5B"]) == {
        a: "m-gsm8k-empg/checkpoint-000225",
        b: "m-gsm8k-grpo/checkpoint-000225",
        "Qwen/Qwen2.5-1.5B": "Qwen/Qwen2.5-1.5B",
    }
    assert ev.labels([a]) == {a: "checkpoint-000225"}


def test_cli_compares_checkpoints_with_the_same_name(tmp_path):
    a, b, data = two_models_and_problems(
        tmp_path, "run-a/checkpoint-000002", "run-b/checkpoint-000002", 3
    )
    out = str(tmp_path / "o")
    r = run_cli(
        "--model",
        a,
        "--model",
        b,
        "--dataset",
        str(data),
        "--max-new-tokens",
        "3",
        "--output-dir",
        out,
        script="eval.py",
    )
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out)) == ["run-a", "run-b", "summary.json"]
    assert os.path.exists(os.path.join(out, "run-a", "checkpoint-000002", "results.jsonl"))
    head = r.stdout.splitlines()[0]
    assert (
        "run-a/checkpoint-000002" in head and "run-b/checkpoint-000002" in head
    )  # whole, distinct labels
    assert (
        "lenient_accuracy" in r.stdout and "self_verification_rate" in r.stdout
    )  # whole metric names
    s = json.loads(r.stdout.strip().splitlines()[-1])[a]
    assert (
        s["model"] == a
        and s["dataset"] == str(data)
        and s["problems"] == 3
        and s["samples_per_problem"] == 1
    )
    assert s["temperature"] == 0 and s["max_new_tokens"] == 3
    p = s["accuracy"]
    assert s["accuracy_se"] == pytest.approx(math.sqrt(p * (1 - p) * 3 / 2 / 3) if 0 < p < 1 else 0)


def test_standard_error_by_hand():
    m, se = ev.mean_and_se([1.0] * 941 + [0.0] * 324)  # 941/1265 = 0.744, the paper's GSM8K score
    assert m == pytest.approx(0.7439, abs=1e-4) and se == pytest.approx(
        0.0123, abs=1e-4
    )  # ±1.2 points


def test_output_dir_is_checked_before_any_work(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    err = bad(
        ["--model", str(tmp_path / "no-model"), "--output-dir", str(tmp_path / "file" / "o")],
        capsys,
    )
    assert err.startswith(
        "eval: error: cannot write to --output-dir"
    )  # not "cannot load model": no work done
    assert "temperature" in bad(
        ["--model", "m", "--temperature", "nan", "--output-dir", str(tmp_path)], capsys
    )
    assert bad(["--model", "m", "--bogus"], capsys).startswith(
        "eval: error: unrecognized arguments"
    )


def test_help_shows_defaults():
    r = run_cli("--help", script="eval.py")
    assert r.returncode == 0 and "(default: 1024)" in r.stdout and "(default: gsm8k)" in r.stdout


def test_grading_one_problem_keeps_to_its_budget(monkeypatch):
    import math_verify

    calls = []

    def slow(*a, **k):
        calls.append(1)
        time.sleep(0.2)
        return False

    monkeypatch.setattr(math_verify, "verify", slow)
    monkeypatch.setattr(ev, "GRADE_BUDGET_S", 0.1)
    monkeypatch.setattr(ev, "MAJ_BUDGET_S", 0.1)
    ev.empg.parse_answer.cache_clear()
    comps = [f"\\boxed{{\\frac{{{i}}}{{{i + 3}}}}}" for i in range(8)] + ["\\boxed{2}"]
    r = ev.score_problem("q", "2", comps, "math")
    # one verify in grading, one in maj@k (each budget then spent), one for the majority answer itself;
    # without the budgets: 8 + 36 + 1
    assert len(calls) == 3
    assert r["correct"][-1] and not any(r["correct"][:-1])  # "2" still equals "2"
