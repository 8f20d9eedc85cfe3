"""Evaluate base models and EMPG checkpoints side by side: the paper's test score (greedy, one sample), pass@k, maj@k,
response length, truncation and reasoning-behaviour markers.

    python eval.py --model Qwen/Qwen2.5-1.5B --model runs/Qwen2.5-1.5B-gsm8k-empg/checkpoint-000225 --dataset gsm8k
    python eval.py --model CKPT --dataset math500 --num-samples 8 --temperature 1.0     # pass@8, maj@8
    python eval.py --grade completions.jsonl --task math                               # grade text you already have
Data, prompts, graders and the sampler are empg.py's own, imported, never copied."""
import argparse, json, math, os, re, sys, time
from collections import Counter

import torch

import empg
from empg import die

# Behaviour markers: a LEXICAL PROXY for the paper's emergent behaviours (§5) — counts of phrases, not a judgment of
# whether the model really verified or backtracked. Every phrase list lives here, matched case-insensitively.
MARKERS = {
    "self_verification": ["let me check", "let's check", "let me verify", "let's verify", "verify", "double-check",
                          "double check", "check our answer", "check the answer", "to confirm", "sanity check"],
    "backtracking": ["wait", "let me reconsider", "let's reconsider", "reconsider", "alternatively", "on second thought",
                     "i made a mistake", "that's not right", "that is not right", "let me try again", "mistake"],
    "subgoal_setting": ["first,", "second,", "next,", "then,", "finally,", "step 1", "step 2", "step one",
                        "let's break", "break this down", "break it down"],
    "backward_chaining": ["working backwards", "work backwards", "working backward", "work backward",
                          "starting from the answer", "start from the answer"],
}
_MARKER_RE = {k: [re.compile(r"(?<!\w)" + re.escape(p) + (r"(?!\w)" if p[-1].isalnum() else "")) for p in v]
              for k, v in MARKERS.items()}


def count_markers(text):
    t = text.lower()
    return {k: sum(len(r.findall(t)) for r in rs) for k, rs in _MARKER_RE.items()}


def pass_at_k(n, c, k):
    """Unbiased pass@k of Chen et al. (2021): 1 − C(n−c, k)/C(n, k), as a stable product."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def majority_vote(answers, same=empg.answers_equal):
    """The most frequent answer up to equivalence (None answers abstain); ties go to the answer seen first."""
    groups = []  # [representative, count]
    for a in answers:
        if a is None:
            continue
        for g in groups:
            if same(g[0], a):
                g[1] += 1
                break
        else:
            groups.append([a, 1])
    return max(groups, key=lambda g: g[1])[0] if groups else None  # max keeps the first of equal counts


def grade(completion, answer, task):
    """Per-completion grade. GSM8K: `strict` is the author's '#### n' rule (the headline number), `lenient` takes
    \\boxed{} / '####' / last number — the gap between them is format learning. MATH: both are the math grader."""
    extracted = empg.extract_answer(completion)
    lenient = empg.math_reward(completion, answer)
    strict = empg.gsm8k_reward(completion, answer) if task == "gsm8k" else lenient
    return dict(extracted=extracted, correct=bool(strict), lenient=bool(lenient))


def score_problem(question, answer, completions, task, lengths=None, truncated=None, k=None):
    k = k or len(completions)
    grades = [grade(c, answer, task) for c in completions]
    ref = empg.final_answer(answer)
    maj = majority_vote([g["extracted"] for g in grades])
    return dict(question=question, answer=ref, completions=completions, extracted=[g["extracted"] for g in grades],
                correct=[g["correct"] for g in grades], lenient=[g["lenient"] for g in grades],
                lengths=lengths or [len(c) for c in completions], truncated=truncated or [False] * len(completions),
                markers=[count_markers(c) for c in completions],
                pass_at_k=pass_at_k(len(grades), sum(g["correct"] for g in grades), k),
                maj_correct=maj is not None and empg.answers_equal(maj, ref), maj_answer=maj)


def summarize(results, k, length_unit):
    n = len(results)
    flat = lambda key: [x for r in results for x in r[key]]
    mean = lambda xs: sum(xs) / max(len(xs), 1)
    s = dict(problems=n, samples_per_problem=k, accuracy=mean(flat("correct")), lenient_accuracy=mean(flat("lenient")),
             mean_length=mean(flat("lengths")), length_unit=length_unit, truncated_frac=mean(flat("truncated")))
    if k > 1:
        s[f"pass@{k}"] = mean([r["pass_at_k"] for r in results])
        s[f"maj@{k}"] = mean([r["maj_correct"] for r in results])
    for m in MARKERS:
        s[f"{m}_rate"] = mean([float(x[m] > 0) for x in flat("markers")])
    return s


def generate(model_name, rows, task, template, args):
    """Completions (k per problem) with empg's own sampler; greedy at temperature 0."""
    dev, dtype = empg.setup(args)
    model = empg.load_model(model_name, dev, dtype).eval()
    tok = empg.load_tokenizer(args.tokenizer or model_name)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    eos = empg.stop_ids(tok, model, template)
    from tqdm import tqdm
    out, bar = [], tqdm(total=len(rows), desc=os.path.basename(model_name.rstrip("/")), dynamic_ncols=True)
    g = torch.Generator(dev).manual_seed(args.seed)
    for i in range(0, len(rows), args.batch_size):
        batch = rows[i:i + args.batch_size]
        prompts = [tok(template.replace("{question}", r["question"]), add_special_tokens=False)["input_ids"]
                   for r in batch]
        comps = empg.sample(model, prompts, args.num_samples, args.max_new_tokens, eos, pad, args.temperature, g,
                             args.sampler)
        texts = tok.batch_decode(comps, skip_special_tokens=True)
        for j, r in enumerate(batch):
            cs = comps[j * args.num_samples:(j + 1) * args.num_samples]
            out.append(score_problem(r["question"], r["answer"], texts[j * args.num_samples:(j + 1) * args.num_samples],
                                     task, [len(c) for c in cs],
                                     [len(c) == args.max_new_tokens and c[-1] not in eos for c in cs]))
        bar.update(len(batch))
        bar.set_postfix(acc=f"{sum(x for r in out for x in r['correct']) / (len(out) * args.num_samples):.3f}")
    bar.close()
    return out


def load_graded_rows(path, task):
    rows = []
    for n, r in enumerate(empg.read_jsonl(path), 1):
        c = r.get("completion", r.get("completions"))
        if "answer" not in r or not (isinstance(c, str) or (isinstance(c, list) and c and all(isinstance(x, str) for x in c))):
            die(f"{path}:{n} needs 'completion' (a string or a list of strings) and 'answer'")
        rows.append((r.get("question", ""), str(r["answer"]), [c] if isinstance(c, str) else c))
    if len({len(c) for _, _, c in rows}) > 1:
        die(f"{path}: every row must have the same number of completions")
    return rows


def table(summaries):
    cols = [c for c in next(iter(summaries.values())) if c not in ("problems", "samples_per_problem", "length_unit")]
    w = max(12, *(len(os.path.basename(m.rstrip("/"))) for m in summaries))
    head = f"{'model':<{w}} " + " ".join(f"{c.replace('_rate', '').replace('_', ' ')[:11]:>11}" for c in cols)
    lines = [head, "-" * len(head)]
    for m, s in summaries.items():
        lines.append(f"{os.path.basename(m.rstrip('/')):<{w}} " + " ".join(
            f"{s[c]:>11.1f}" if c == "mean_length" else f"{s[c]:>11.3f}" for c in cols))
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", default=[], help="hub name or checkpoint dir; repeat to compare")
    p.add_argument("--tokenizer", default="", help="tokenizer (default: the model's own)")
    p.add_argument("--dataset", default="gsm8k", help="gsm8k | math500 | math-hard (= MATH-500) | math-hard-l5 | PATH.jsonl")
    p.add_argument("--data-dir", default="", help="local folder laid out like ../shared/data (default: the hub)")
    p.add_argument("--prompt-template", default="", help="prompt with a {question} placeholder (default: the dataset's)")
    p.add_argument("--limit", type=int, default=0, help="first N problems only (0: all)")
    p.add_argument("--num-samples", type=int, default=1, help="k samples per problem (pass@k, maj@k when k > 1)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the paper's test score)")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="completion length cap")
    p.add_argument("--batch-size", type=int, default=32, help="problems per sampler call")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--sampler", default="auto", choices=["auto", "compiled", "static", "hf"], help="decode loop (empg.py --help)")
    p.add_argument("--device", default="auto", help="cuda | cpu | auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"], help="auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--output-dir", default="", help="default: eval_runs/<dataset>")
    p.add_argument("--grade", default="", help="grade a JSONL of {completion(s), answer} instead of sampling")
    p.add_argument("--task", default="math", choices=["gsm8k", "math"], help="grader for --grade")
    a = p.parse_args(argv)
    if a.num_samples < 1:
        die("--num-samples must be >= 1")
    if a.batch_size < 1 or a.max_new_tokens < 1 or a.limit < 0 or a.temperature < 0:
        die("--batch-size and --max-new-tokens must be >= 1, --limit and --temperature >= 0")
    if a.num_samples > 1 and a.temperature == 0:
        die("--num-samples > 1 with greedy decoding gives k identical samples: set --temperature (e.g. 1.0)")
    if not a.grade and not a.model:
        die("give --model (one or more) or --grade FILE.jsonl")
    return a


def main(argv=None):
    args = parse_args(argv)
    out_dir = args.output_dir or os.path.join("eval_runs", os.path.basename(args.grade or args.dataset).replace(".jsonl", ""))
    summaries, per_model = {}, {}
    if args.grade:
        rows = load_graded_rows(args.grade, args.task)
        k = len(rows[0][2])
        per_model[args.grade] = [score_problem(q, a, cs, args.task, k=k) for q, a, cs in rows]
        unit = "chars"
    else:
        rows, task = empg.load_problems(args.dataset, "test", args.data_dir)
        rows = rows[:args.limit or None]
        template = args.prompt_template or empg.default_template(args.dataset, task)
        for m in args.model:
            t0 = time.time()
            per_model[m] = generate(m, rows, task, template, args)
            print(f"{m}: {len(rows)} problems in {time.time() - t0:.1f}s", file=sys.stderr)
        k, unit = args.num_samples, "tokens"
    os.makedirs(out_dir, exist_ok=True)
    for m, results in per_model.items():
        name = os.path.basename(m.rstrip("/")) or "model"
        d = os.path.join(out_dir, name) if len(per_model) > 1 else out_dir
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "results.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in results)
        summaries[m] = summarize(results, k, unit)
        with open(os.path.join(d, "summary.json"), "w") as f:
            json.dump(summaries[m], f, indent=1)
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summaries if len(summaries) > 1 else next(iter(summaries.values())), f, indent=1)
    print(table(summaries))
    print(json.dumps(summaries))
    return summaries


if __name__ == "__main__":
    main()
