"""Models and checkpoints side by side: the paper's test score (greedy) ± its standard error, pass@k,
maj@k, length, truncation, lexical markers of reasoning, with empg.py's data, graders and sampler.

    python eval.py --model Qwen/Qwen2.5-1.5B --model runs/Qwen2.5-1.5B-gsm8k-empg/checkpoint-000225
    python eval.py --model CKPT --dataset math500 --num-samples 8 --temperature 1.0  # pass@8, maj@8
    python eval.py --grade completions.jsonl --task math  # grade text you already have"""

import json, math, os, re, tempfile, time
from dataclasses import dataclass

import torch

import empg
from empg import arg, die, grade

# Behaviour markers: a LEXICAL PROXY for the paper's emergent behaviours (§5): phrase counts, not a
# judgment of whether the model really verified or backtracked.
MARKERS = {
    "self_verification": [
        "let me check", "let's check", "verify", "double-check", "double check", "check our answer",
        "check the answer", "to confirm", "sanity check"],
    "backtracking": [
        "wait", "reconsider", "alternatively", "on second thought", "that's not right",
        "that is not right", "let me try again", "mistake"],
    "subgoal_setting": [
        "first,", "second,", "next,", "then,", "finally,", "step 1", "step 2", "step one",
        "break this down", "break it down"],
    "backward_chaining": [
        "working backwards", "work backwards", "working backward", "work backward",
        "starting from the answer", "start from the answer"],
}  # fmt: skip
MARKER_RES = {
    k: [re.compile(r"(?<!\w)" + re.escape(p) + (r"(?!\w)" if p[-1].isalnum() else "")) for p in v]
    for k, v in MARKERS.items()
}
# per problem: past these, grading and maj@k stop asking math-verify and compare strings only
GRADE_BUDGET_S, MAJ_BUDGET_S = 60, 30


@dataclass
class EvalArgs:
    model: list = arg((), "hub name or checkpoint dir; repeat to compare")
    tokenizer: str = arg("", "default: the model's")
    dataset: str = arg("gsm8k", "gsm8k, math500 (= math-hard's test set), math-hard-l5, a .jsonl")
    data_dir: str = arg("", "a local copy laid out like ../shared/data")
    prompt_template: str = arg("", "with a {question} placeholder (default: the dataset's)")
    max_prompt_chars: int = arg(-1, "drop longer prompts (-1: empg's preset)", bounds="[-1, inf)")
    stop_at_im_end: bool = arg(False, "end completions at <|im_end|> too")
    limit: int = arg(0, "the first N problems only (0: all)")
    num_samples: int = arg(1, "k samples a problem (pass@k, maj@k)", bounds="[1, inf)")
    temperature: float = arg(0.0, "0 = greedy (the paper's test score)", bounds="[0, 10]")
    max_new_tokens: int = arg(1024, "completion length cap", bounds="[1, inf)")
    batch_size: int = arg(32, "problems per sampler call", bounds="[1, inf)")
    seed: int = arg(0, "sampling seed", bounds="[0, 2147483647]")
    sampler: str = arg("auto", "decode loop (empg's --sampler)", "auto compiled static hf")
    device: str = arg("auto", "auto, cuda, cuda:N or cpu")
    dtype: str = arg("auto", "auto: bf16 on CUDA", "auto bf16 fp32")
    output_dir: str = arg("", "default: eval_runs/<dataset>")
    grade: str = arg("", "grade a JSONL of {completion(s), answer}, no sampling")
    task: str = arg("math", "grader for --grade", "gsm8k math")


def count_markers(text):
    t = text.lower()
    return {k: sum(len(r.findall(t)) for r in rs) for k, rs in MARKER_RES.items()}


def pass_at_k(n, c, k):
    """Unbiased pass@k of Chen et al. (2021): 1 − C(n−c, k)/C(n, k), as a stable product."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def majority_vote(answers, same=empg.answers_equal, budget_s=MAJ_BUDGET_S):
    """The most frequent answer up to `same` (None abstains; ties: the first); past budget_s seconds,
    equal strings only."""
    groups, t0 = [], time.time()
    for a in (a for a in answers if a is not None):
        for g in groups:
            if g[0] == a or (time.time() - t0 < budget_s and same(g[0], a)):
                g[1] += 1
                break
        else:
            groups.append([a, 1])
    return max(groups, key=lambda g: g[1])[0] if groups else None  # max keeps the first of ties


def score_problem(question, answer, completions, task, lengths=None, truncated=None, k=None):
    """Grades, pass@k and maj@k of a problem, in bounded time; maj@k votes by accuracy's rule."""
    k, ref, t0, grades = k or len(completions), empg.final_answer(answer), time.time(), []
    for c in completions:  # past the problem's budget, equal strings only: no math-verify pile-up
        grades.append(grade(c, answer, task, verify=time.time() - t0 < GRADE_BUDGET_S))
    extracted = [g["extracted"] for g in grades]
    same = str.__eq__ if task == "gsm8k" else empg.answers_equal
    ref = ref.replace(",", "") if task == "gsm8k" else ref
    maj = majority_vote(extracted, same, MAJ_BUDGET_S)
    maj_ok = maj is not None and same(maj, ref)
    correct = [g["correct"] for g in grades]
    return dict(question=question, answer=ref, completions=completions, extracted=extracted,
                correct=correct, lenient=[g["lenient"] for g in grades],
                lengths=lengths or [len(c) for c in completions],
                truncated=truncated or [False] * len(completions),
                markers=[count_markers(c) for c in completions],
                pass_at_k=pass_at_k(len(grades), sum(correct), k), maj_correct=maj_ok,
                maj_answer=maj)  # fmt: skip


def mean_and_se(per_problem):
    """The mean over problems and its standard error sqrt(s²/n)."""
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


def sample_and_score(model_name, label, rows, task, template, args):
    """k completions a problem, scored; batches padded to --batch-size (one KV cache)."""
    from tqdm import tqdm

    dev, dtype = empg.device_and_dtype(args)
    model = empg.load_model(model_name, dev, dtype, insist_cpu=args.device == "cpu").eval()
    tok = empg.load_tokenizer(args.tokenizer or model_name)
    eos = empg.stop_ids(tok, model, args.stop_at_im_end)
    rows = empg.prepare(rows, tok, template, 0, model, args.max_new_tokens, "test")
    decoder = empg.make_decoder(model, args.sampler)
    out, bar = [], tqdm(total=len(rows), desc=label)
    g, B, n = torch.Generator(dev).manual_seed(args.seed), args.batch_size, args.num_samples
    for i in range(0, len(rows), B):
        batch = rows[i : i + B]
        prompts = [r["ids"] for r in batch] + [batch[-1]["ids"]] * (B - len(batch))
        comps = empg.sample(decoder, prompts, n, args.max_new_tokens, eos, tok.pad_token_id,
                            args.temperature, g)[: len(batch) * n]  # fmt: skip
        texts = tok.batch_decode(comps)  # special tokens kept, as in empg.train()
        for j, r in enumerate(batch):
            cs, ts = comps[j * n : (j + 1) * n], texts[j * n : (j + 1) * n]
            cut = [len(c) == args.max_new_tokens and c[-1] not in eos for c in cs]
            out.append(score_problem(r["question"], r["answer"], ts, task, list(map(len, cs)), cut))
        bar.update(len(batch))
        bar.set_postfix(acc=f"{sum(x for r in out for x in r['correct']) / (len(out) * n):.3f}")
    bar.close()
    return out


def load_graded_rows(path):
    rows = []
    for n, r in empg.read_jsonl(path):
        c = r.get("completion", r.get("completions"))
        c = [c] if isinstance(c, str) else c
        ok = isinstance(c, list) and c and all(isinstance(x, str) for x in c)
        if "answer" not in r or not ok:
            die(f"{path}:{n} needs 'completion' (a string or list of strings) and 'answer'")
        rows.append((r.get("question", ""), str(r["answer"]), c))
    if len({len(c) for _, _, c in rows}) > 1:
        die(f"{path}: every row must have the same number of completions")
    return rows


def labels(names):
    """The shortest path suffixes that tell the models apart (run-a/checkpoint-000225, ...)."""
    parts = [os.path.normpath(n).split(os.sep) for n in names]
    for k in range(1, max(map(len, parts)) + 1):
        got = ["/".join(p[-k:]) for p in parts]
        if len(set(got)) == len(got):
            return dict(zip(names, got))
    return {n: n for n in names}


def table(summaries, names):
    """Metrics down, models across."""
    first = next(iter(summaries.values()))
    keys = [k for k, v in first.items() if type(v) is float and not k.endswith("_se")]
    keys = [k for k in keys if k != "temperature"]  # the metrics: the float columns
    cell = lambda s, k: (
        (f"{s[k]:.1f}" if k == "mean_length" else f"{s[k]:.3f}")
        + (f" ±{s[k + '_se']:.3f}" if k + "_se" in s else "")
    )
    cols = [[names[m]] + [cell(s, k) for k in keys] for m, s in summaries.items()]
    widths, left = [max(9, *map(len, c)) for c in cols], max(map(len, keys))
    lines = [
        " ".join([f"{k:<{left}}"] + [f"{c[i]:>{w}}" for c, w in zip(cols, widths)])
        for i, k in enumerate(["", *keys])
    ]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def writable_dir(path):
    """Tested before any work: a bad path fails now, not after hours."""
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        die(f"cannot write to --output-dir {path}: {e.strerror}")
    return path


def main(argv=None):
    args = empg.parse_args(argv, EvalArgs, prog="eval")
    if args.num_samples > 1 and args.temperature == 0:
        die("--num-samples > 1 needs --temperature > 0 (e.g. 1.0)")
    if not (args.grade or args.model) or len(set(args.model)) < len(args.model):
        die("give --model (one or more, each once) or --grade FILE.jsonl")
    name = os.path.basename(args.grade or args.dataset).replace(".jsonl", "")
    out_dir = writable_dir(args.output_dir or f"eval_runs/{name}")
    results, settings = {}, {}
    if args.grade:
        rows = load_graded_rows(args.grade)
        k, unit = len(rows[0][2]), "chars"
        results[args.grade] = [score_problem(q, a, cs, args.task, k=k) for q, a, cs in rows]
        settings[args.grade] = dict(model=args.grade, dataset=args.grade)
    else:
        rows, task = empg.load_problems(args.dataset, "test", args.data_dir)
        template = args.prompt_template or empg.default_template(args.dataset, task)
        chars = args.max_prompt_chars
        if chars < 0 and not args.dataset.endswith(".jsonl"):
            chars = empg.PRESETS["gsm8k" if task == "gsm8k" else "math-hard"]["max_prompt_chars"]
        rows = empg.keep_short(rows, template, max(chars, 0))[: args.limit or None]
        if not rows:
            die(f"no {args.dataset} problem is left after --max-prompt-chars {chars} and --limit")
        k, unit = args.num_samples, "tokens"
        for m, label in labels(args.model).items():
            t0 = time.time()
            results[m] = sample_and_score(m, label, rows, task, template, args)
            empg.say(f"{m}: {len(rows)} problems in {time.time() - t0:.1f}s")
            settings[m] = dict(model=m, dataset=args.dataset, temperature=args.temperature)
            settings[m].update(max_new_tokens=args.max_new_tokens, max_prompt_chars=chars)
    names = labels(list(results))
    summaries = {m: summarize(r, k, unit, settings[m]) for m, r in results.items()}
    for m, r in results.items():
        d = os.path.join(out_dir, names[m]) if len(results) > 1 else out_dir
        os.makedirs(d, exist_ok=True)
        empg.write_atomic(f"{d}/results.jsonl", "".join(json.dumps(x) + "\n" for x in r))
        empg.write_atomic(f"{d}/summary.json", json.dumps(summaries[m], indent=1))
    one = next(iter(summaries.values())) if len(summaries) == 1 else summaries
    empg.write_atomic(f"{out_dir}/summary.json", json.dumps(one, indent=1))
    print(table(summaries, names))
    print(json.dumps(summaries))
    return summaries


if __name__ == "__main__":
    main()
