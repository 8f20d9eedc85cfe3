"""Evaluate base models and EMPG checkpoints side by side: the paper's test score (greedy, one
sample) with its standard error, pass@k, maj@k, response length, truncation and lexical markers of
reasoning behaviour.

    python eval.py --model Qwen/Qwen2.5-1.5B --model runs/Qwen2.5-1.5B-gsm8k-empg/checkpoint-000225
    python eval.py --model CKPT --dataset math500 --num-samples 8 --temperature 1.0  # pass@8, maj@8
    python eval.py --grade completions.jsonl --task math           # grade text you already have

Data, prompts, the prompt filter, graders and the sampler are empg.py's own, imported, never copied:
the numbers here are the trainer's in-run test score, computed the same way."""

import argparse, json, math, os, re, sys, time

import torch

import empg
from empg import die, grade

# Behaviour markers: a LEXICAL PROXY for the paper's emergent behaviours (§5), counts of phrases,
# not a judgment of whether the model really verified or backtracked. Matched case-insensitively.
MARKERS = {
    "self_verification": ["let me check", "let's check", "let me verify", "let's verify", "verify",
                          "double-check", "double check", "check our answer", "check the answer",
                          "to confirm", "sanity check"],
    "backtracking": ["wait", "let me reconsider", "let's reconsider", "reconsider", "alternatively",
                     "on second thought", "i made a mistake", "that's not right", "that is not right",
                     "let me try again", "mistake"],
    "subgoal_setting": ["first,", "second,", "next,", "then,", "finally,", "step 1", "step 2",
                        "step one", "let's break", "break this down", "break it down"],
    "backward_chaining": ["working backwards", "work backwards", "working backward", "work backward",
                          "starting from the answer", "start from the answer"],
}  # fmt: skip
_MARKER_RE = {
    k: [re.compile(r"(?<!\w)" + re.escape(p) + (r"(?!\w)" if p[-1].isalnum() else "")) for p in v]
    for k, v in MARKERS.items()
}
# per problem: past these, grading and maj@k stop asking math-verify and compare strings only
GRADE_BUDGET_S, MAJ_BUDGET_S = 60, 30


def count_markers(text):
    t = text.lower()
    return {k: sum(len(r.findall(t)) for r in rs) for k, rs in _MARKER_RE.items()}


def pass_at_k(n, c, k):
    """Unbiased pass@k of Chen et al. (2021): 1 − C(n−c, k)/C(n, k), as a stable product."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def majority_vote(answers, same=empg.answers_equal, budget_s=None):
    """The most frequent answer up to equivalence (None abstains); ties go to the answer seen first.
    Equal strings never reach `same`; after budget_s seconds only equal strings count as one."""
    groups, t0, budget_s = [], time.time(), MAJ_BUDGET_S if budget_s is None else budget_s
    for a in answers:
        if a is None:
            continue
        for g in groups:
            if g[0] == a or (time.time() - t0 < budget_s and same(g[0], a)):
                g[1] += 1
                break
        else:
            groups.append([a, 1])
    return max(groups, key=lambda g: g[1])[0] if groups else None  # max keeps the first of ties


def score_problem(question, answer, completions, task, lengths=None, truncated=None, k=None):
    """Grades, pass@k and maj@k for one problem, in bounded time (GRADE_BUDGET_S, MAJ_BUDGET_S).
    maj@k votes with the rule accuracy uses: for GSM8K the strict '#### n' answers, compared as
    strings; for MATH, math-verify equivalence."""
    k, ref, t0, grades = k or len(completions), empg.final_answer(answer), time.time(), []
    for c in completions:  # past the problem's budget, equal strings only: no math-verify pile-up
        grades.append(grade(c, answer, task, verify=time.time() - t0 < GRADE_BUDGET_S))
    if task == "gsm8k":
        ref = ref.replace(",", "")
        maj = majority_vote([g["extracted"] for g in grades], same=lambda x, y: x == y)
    else:
        maj = majority_vote([g["extracted"] for g in grades])
    maj_ok = maj is not None and (maj == ref if task == "gsm8k" else empg.answers_equal(maj, ref))
    return dict(question=question, answer=ref, completions=completions,
                extracted=[g["extracted"] for g in grades], correct=[g["correct"] for g in grades],
                lenient=[g["lenient"] for g in grades], lengths=lengths or [len(c) for c in completions],
                truncated=truncated or [False] * len(completions),
                markers=[count_markers(c) for c in completions],
                pass_at_k=pass_at_k(len(grades), sum(g["correct"] for g in grades), k),
                maj_correct=maj_ok, maj_answer=maj)  # fmt: skip


def mean_and_se(per_problem):
    """The mean over problems and its standard error, sqrt(s²/n): for one greedy sample a problem,
    the binomial sqrt(p(1 − p)/n), ±1.2 points at 0.744 on GSM8K's 1265 problems."""
    n, m = len(per_problem), sum(per_problem) / max(len(per_problem), 1)
    var = sum((x - m) ** 2 for x in per_problem) / max(n - 1, 1)
    return m, math.sqrt(var / max(n, 1))


def summarize(results, k, length_unit, settings):
    per = lambda key: [sum(r[key]) / len(r[key]) for r in results]
    flat = lambda key: [x for r in results for x in r[key]]
    mean = lambda xs: sum(xs) / max(len(xs), 1)
    acc, se = mean_and_se(per("correct"))
    lenient, lenient_se = mean_and_se(per("lenient"))
    s = dict(settings, problems=len(results), samples_per_problem=k, accuracy=acc, accuracy_se=se,
             lenient_accuracy=lenient, lenient_accuracy_se=lenient_se, mean_length=mean(flat("lengths")),
             length_unit=length_unit, truncated_frac=mean(flat("truncated")))  # fmt: skip
    if k > 1:
        s[f"pass@{k}"], s[f"pass@{k}_se"] = mean_and_se([r["pass_at_k"] for r in results])
        s[f"maj@{k}"], s[f"maj@{k}_se"] = mean_and_se([float(r["maj_correct"]) for r in results])
    for m in MARKERS:
        s[f"{m}_rate"] = mean([float(x[m] > 0) for x in flat("markers")])
    return s


def generate(model_name, rows, task, template, args):
    """Completions (k per problem) from empg's own sampler; greedy at temperature 0. Batches are
    padded to --batch-size, so the decoder keeps one KV cache (and its compiled graphs)."""
    dev, dtype = empg.device_and_dtype(args)
    model = empg.load_model(model_name, dev, dtype, insist_cpu=args.device == "cpu").eval()
    tok = empg.load_tokenizer(args.tokenizer or model_name)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    eos = empg.stop_ids(tok, model, template)
    rows = empg.prepare(rows, tok, template, 0, model, args.max_new_tokens, "test")
    decoder = empg.make_decoder(model, args.sampler)
    from tqdm import tqdm

    out, bar = [], tqdm(total=len(rows), desc=label_of(model_name), dynamic_ncols=True)
    g, B, n = torch.Generator(dev).manual_seed(args.seed), args.batch_size, args.num_samples
    for i in range(0, len(rows), B):
        batch = rows[i : i + B]
        prompts = [r["ids"] for r in batch] + [batch[-1]["ids"]] * (B - len(batch))
        comps = empg.sample(model, prompts, n, args.max_new_tokens, eos, pad, args.temperature, g,
                            decoder)[: len(batch) * n]  # fmt: skip
        texts = tok.batch_decode(comps, skip_special_tokens=True)
        for j, r in enumerate(batch):
            cs, ts = comps[j * n : (j + 1) * n], texts[j * n : (j + 1) * n]
            cut = [len(c) == args.max_new_tokens and c[-1] not in eos for c in cs]
            out.append(
                score_problem(r["question"], r["answer"], ts, task, [len(c) for c in cs], cut)
            )
        bar.update(len(batch))
        bar.set_postfix(acc=f"{sum(x for r in out for x in r['correct']) / (len(out) * n):.3f}")
    bar.close()
    return out


def load_graded_rows(path):
    rows = []
    for n, r in empg.read_jsonl(path):
        c = r.get("completion", r.get("completions"))
        ok = isinstance(c, str) or (
            isinstance(c, list) and c and all(isinstance(x, str) for x in c)
        )
        if "answer" not in r or not ok:
            die(f"{path}:{n} needs 'completion' (a string or a list of strings) and 'answer'")
        rows.append((r.get("question", ""), str(r["answer"]), [c] if isinstance(c, str) else c))
    if len({len(c) for _, _, c in rows}) > 1:
        die(f"{path}: every row must have the same number of completions")
    return rows


def label_of(name):
    return os.path.basename(name.rstrip("/")) or name


def labels(names):
    """The shortest path suffix that tells the models apart: two checkpoint-000225 dirs from
    different runs become run-a/checkpoint-000225 and run-b/checkpoint-000225."""
    parts = [os.path.normpath(n).split(os.sep) for n in names]
    for k in range(1, max(map(len, parts)) + 1):
        got = ["/".join(p[-k:]) for p in parts]
        if len(set(got)) == len(got):
            return dict(zip(names, got))
    return {n: n for n in names}


def table(summaries, names):
    """Metrics down, models across: every column header whole."""
    skip = ("model", "dataset", "problems", "samples_per_problem", "length_unit", "temperature",
            "max_new_tokens", "max_prompt_chars")  # fmt: skip
    keys = [k for k in next(iter(summaries.values())) if k not in skip and not k.endswith("_se")]
    w = max(map(len, keys))
    cols = [max(9, len(names[m])) for m in summaries]
    fmt = lambda k, v: f"{v:.1f}" if k == "mean_length" else f"{v:.3f}"
    se = lambda s, k: f" ±{s[k + '_se']:.3f}" if k + "_se" in s else ""
    cells = {m: {k: fmt(k, s[k]) + se(s, k) for k in keys} for m, s in summaries.items()}
    cols = [max(c, *(len(cells[m][k]) for k in keys)) for c, m in zip(cols, summaries)]
    head = " ".join([f"{'':<{w}}"] + [f"{names[m]:>{c}}" for m, c in zip(summaries, cols)])
    lines = [head, "-" * len(head)]
    for k in keys:
        lines.append(
            " ".join([f"{k:<{w}}"] + [f"{cells[m][k]:>{c}}" for m, c in zip(summaries, cols)])
        )
    return "\n".join(lines)


def parse_args(argv=None):
    fmt = type(
        "F", (argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter), {}
    )
    p = argparse.ArgumentParser(prog="eval.py", description=__doc__, formatter_class=fmt)
    p.error, add = (lambda msg: die(msg)), p.add_argument
    add(
        "--model", action="append", default=[], help="hub name or checkpoint dir; repeat to compare"
    )
    add("--tokenizer", default="", help="tokenizer (default: the model's own)")
    add(
        "--dataset",
        default="gsm8k",
        help="gsm8k | math500 | math-hard (= MATH-500) | math-hard-l5 | PATH.jsonl",
    )
    add(
        "--data-dir",
        default="",
        help="local folder laid out like ../shared/data (default: the hub)",
    )
    add(
        "--prompt-template",
        default="",
        help="prompt with a {question} placeholder (default: the dataset's)",
    )
    add("--max-prompt-chars", type=int, default=-1, help="drop longer prompts (-1: the author's filter, "
        "512 for gsm8k, 1024 for MATH, as in empg.py; 0: keep all)")  # fmt: skip
    add("--limit", type=int, default=0, help="the first N problems only (0: all)")
    add(
        "--num-samples",
        type=int,
        default=1,
        help="k samples per problem (pass@k, maj@k when k > 1)",
    )
    add("--temperature", type=float, default=0.0, help="0 = greedy (the paper's test score)")
    add("--max-new-tokens", type=int, default=1024, help="completion length cap")
    add("--batch-size", type=int, default=32, help="problems per sampler call")
    add("--seed", type=int, default=0, help="sampling seed")
    add(
        "--sampler",
        default="auto",
        choices=["auto", "compiled", "static", "hf"],
        help="decode loop",
    )
    add("--device", default="auto", help="auto | cuda | cuda:N | cpu")
    add("--dtype", default="auto", choices=["auto", "bf16", "fp32"], help="auto: bf16 on CUDA")
    add("--output-dir", default="", help="default: eval_runs/<dataset>")
    add("--grade", default="", help="grade a JSONL of {completion(s), answer} instead of sampling")
    add("--task", default="math", choices=["gsm8k", "math"], help="grader for --grade")
    a = p.parse_args(argv)
    checks = [
        (a.num_samples >= 1, "--num-samples must be >= 1"),
        (
            a.batch_size >= 1 and a.max_new_tokens >= 1,
            "--batch-size and --max-new-tokens must be >= 1",
        ),
        (
            a.limit >= 0 and a.max_prompt_chars >= -1,
            "--limit must be >= 0, --max-prompt-chars >= -1",
        ),
        (
            math.isfinite(a.temperature) and 0 <= a.temperature <= 10,
            "--temperature must be in [0, 10]",
        ),
        (
            a.num_samples == 1 or a.temperature > 0,
            "--num-samples > 1 needs --temperature > 0 (e.g. 1.0)",
        ),
        (
            re.fullmatch(r"auto|cpu|cuda(:\d+)?", a.device),
            "--device must be auto, cpu, cuda or cuda:N",
        ),
        (bool(a.grade) or bool(a.model), "give --model (one or more) or --grade FILE.jsonl"),
        (len(set(a.model)) == len(a.model), "the same --model twice"),
    ]
    for ok, msg in checks:
        if not ok:
            die(msg)
    return a


def writable_dir(path):
    """Created and tested before any work: a read-only or misspelled path fails now, not after hours."""
    try:
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, ".write-test"), "w") as f:
            f.write("ok")
        os.remove(os.path.join(path, ".write-test"))
    except OSError as e:
        die(f"cannot write to --output-dir {path}: {e.strerror}")
    return path


def write_json(path, obj, lines=False):
    text = "".join(json.dumps(r) + "\n" for r in obj) if lines else json.dumps(obj, indent=1)
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def main(argv=None):
    prog, empg.PROG = empg.PROG, "eval"  # errors from empg's loaders name this program
    try:
        return evaluate_all(parse_args(argv))
    finally:
        empg.PROG = prog


def evaluate_all(args):
    name = os.path.basename(args.grade or args.dataset).replace(".jsonl", "")
    out_dir = writable_dir(args.output_dir or os.path.join("eval_runs", name))
    per_model, settings = {}, {}
    if args.grade:
        rows = load_graded_rows(args.grade)
        k, unit = len(rows[0][2]), "chars"
        per_model[args.grade] = [score_problem(q, a, cs, args.task, k=k) for q, a, cs in rows]
        settings[args.grade] = dict(model=args.grade, dataset=args.grade)
    else:
        rows, task = empg.load_problems(args.dataset, "test", args.data_dir)
        template = args.prompt_template or empg.default_template(args.dataset, task)
        chars = args.max_prompt_chars
        if chars < 0:
            chars = empg.PRESETS["gsm8k" if task == "gsm8k" else "math-hard"]["max_prompt_chars"]
            chars = 0 if args.dataset.endswith(".jsonl") else chars
        rows = empg.keep_short(rows, template, chars)
        rows = rows[: args.limit or None]
        if not rows:
            die(f"no {args.dataset} problem is left after --max-prompt-chars {chars} and --limit")
        k, unit = args.num_samples, "tokens"
        for m in args.model:
            t0 = time.time()
            per_model[m] = generate(m, rows, task, template, args)
            print(f"eval: {m}: {len(rows)} problems in {time.time() - t0:.1f}s", file=sys.stderr)
            settings[m] = dict(model=m, dataset=args.dataset, temperature=args.temperature,
                               max_new_tokens=args.max_new_tokens, max_prompt_chars=chars)  # fmt: skip
    names, summaries = labels(list(per_model)), {}
    for m, results in per_model.items():
        d = os.path.join(out_dir, names[m]) if len(per_model) > 1 else out_dir
        os.makedirs(d, exist_ok=True)
        summaries[m] = summarize(results, k, unit, settings[m])
        write_json(os.path.join(d, "results.jsonl"), results, lines=True)
        write_json(os.path.join(d, "summary.json"), summaries[m])
    write_json(
        os.path.join(out_dir, "summary.json"), summaries if len(summaries) > 1 else summaries[m]
    )
    print(table(summaries, names))
    print(json.dumps(summaries))
    return summaries


if __name__ == "__main__":
    main()
