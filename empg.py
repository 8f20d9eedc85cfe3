"""EM Policy Gradient (EMPG) — train an LLM to reason, in one file.

Tianbing Xu, "Training Large Language Models to Reason via EM Policy Gradient" (arXiv 2504.18587).
Each step of Algorithm 1:
  E-step   freeze θ* ← θ and sample N completions per prompt from Pθ* at temperature 1
  reward   R(τ) ∈ {0,1}; smooth it: R̃ = sigmoid((R − μ)/σ) over the batch
  M-step   ascend E_{τ~θ*}[(R̃(τ) − b) ∇ log Pθ(τ)] — no importance ratio, no clipping (Eq. 12)
`--algo grpo` swaps in the paper's comparator: group z-score advantages and the PPO-clip surrogate.

    python empg.py --model Qwen/Qwen2.5-1.5B                       # GSM8K, the paper's setup
    python empg.py --model Qwen/Qwen2.5-1.5B --dataset math-hard   # MATH levels 3-5
"""
import argparse, contextlib, copy, json, math, os, re, shutil, sys, time
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


# ----------------------------------------------------------------------------------------------
# 1. Arguments — defaults follow the author's released code; the paper's value is noted where it differs
def arg(default, help, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class Args:
    model: str = arg("Qwen/Qwen2.5-1.5B", "hub name or local dir (a config-only dir gives random weights)")
    tokenizer: str = arg("", "tokenizer hub name or dir (default: --model)")
    dataset: str = arg("gsm8k", "gsm8k | math-hard | PATH.jsonl (rows with question/problem/prompt and answer)")
    data_dir: str = arg("", "local folder laid out like ../shared/data (default: the Hugging Face hub)")
    prompt_template: str = arg("", "prompt with a {question} placeholder (default: the dataset's)")
    algo: str = arg("empg", "empg (Eq. 12) or grpo (the paper's comparator)", ["empg", "grpo"])
    steps: int = arg(225, "optimizer steps = E-steps (the paper's 1.5B GSM8K run: 225)")
    prompts_per_step: int = arg(32, "prompts per E-step")
    num_samples: int = arg(8, "N completions per prompt")
    sampler: str = arg("auto", "E-step decode loop: compiled (CUDA graph) | static (fixed-shape KV cache) | hf "
                       "(model forward + DynamicCache); auto: compiled on CUDA, static on CPU or with --master-dtype bf16",
                       ["auto", "compiled", "static", "hf"])
    temperature: float = arg(1.0, "sampling temperature (pure sampling: no top-k/top-p)")
    max_new_tokens: int = arg(1024, "completion length cap; longer ones are truncated and count as wrong if unfinished")
    reward_norm: str = arg("batch", "statistics for R̃=sigmoid((R-μ)/σ): batch (paper), group (per prompt), none (R̃=R)",
                           ["batch", "group", "none"])
    baseline: str = arg("half", "b in A=2(R̃-b): half (author's 2·sigmoid(z)-1) or mean (paper text)", ["half", "mean"])
    beta: float = arg(0.0, "KL(πθ‖π_init) coefficient, k3 estimator; 0 loads no reference model")
    entropy_coef: float = arg(0.0, "entropy bonus coefficient")
    clip_eps: float = arg(0.2, "PPO clip ε (grpo only)")
    updates_per_batch: int = arg(1, "optimizer steps per E-step buffer (paper: 1)")
    lr: float = arg(1e-6, "AdamW learning rate (constant)")
    weight_decay: float = arg(0.01, "AdamW weight decay")
    grad_clip: float = arg(1.0, "global grad-norm clip")
    micro_batch_size: int = arg(8, "sequences per forward/backward in the M-step")
    micro_batch_tokens: int = arg(0, "if > 0: micro-batches by size instead, count × padded length ≤ this (e.g. "
                                     "16384 on an 80 GB GPU): short completions share bigger batches")
    logprob_chunk: int = arg(1024, "tokens per chunk of the vocab projection + logsumexp")
    gradient_checkpointing: str = arg("auto", "recompute layer activations in backward (auto: on for CUDA)",
                                      ["auto", "on", "off"])
    dtype: str = arg("auto", "compute dtype (auto: bf16 on CUDA or with --master-dtype bf16, else fp32)",
                     ["auto", "bf16", "fp32"])
    master_dtype: str = arg("fp32", "trained weights + AdamW moments: fp32, or bf16 with stochastic rounding "
                            "(Qwen2.5-7B on one 80 GB GPU; one process only)", ["fp32", "bf16"])
    device: str = arg("auto", "cuda | cpu | auto")
    seed: int = arg(0, "seed for data order and sampling")
    output_dir: str = arg("", "where metrics, samples and checkpoints go (default: runs/<model>-<dataset>-<algo>)")
    save_every: int = arg(50, "checkpoint every this many steps (and at the end)")
    log_samples: int = arg(4, "completions per step written to samples.jsonl")
    resume: bool = arg(False, "continue from the latest checkpoint in --output-dir")
    benchmark: bool = arg(False, "time one E-step (ours vs model.generate()) and one M-step, print a JSON line, exit")


def die(msg):
    """One clear line on stderr (from the first process only), no traceback, exit 2."""
    if os.environ.get("RANK", "0") == "0":
        print(f"empg: error: {msg}", file=sys.stderr)
    else:
        time.sleep(3)  # torchrun stops every process once one exits: let the first one print
    sys.exit(2)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(Args):
        flag, h = "--" + f.name.replace("_", "-"), f"{f.metadata['help']} (default: {f.default})"
        if f.type is bool:
            p.add_argument(flag, action="store_true", help=h)
        else:
            p.add_argument(flag, type=f.type, default=f.default, choices=f.metadata["choices"], help=h)
    a = Args(**vars(p.parse_args(argv)))
    checks = [(a.steps >= 1, "--steps must be >= 1"), (a.prompts_per_step >= 1, "--prompts-per-step must be >= 1"),
              (a.num_samples >= 1, "--num-samples must be >= 1"), (a.temperature > 0, "--temperature must be > 0"),
              (a.max_new_tokens >= 1, "--max-new-tokens must be >= 1"), (a.lr >= 0, "--lr must be >= 0"),
              (a.micro_batch_size >= 1, "--micro-batch-size must be >= 1"),
              (a.micro_batch_tokens >= 0, "--micro-batch-tokens must be >= 0"), (a.logprob_chunk >= 1, "--logprob-chunk must be >= 1"),
              (a.updates_per_batch >= 1, "--updates-per-batch must be >= 1"), (a.save_every >= 1, "--save-every must be >= 1"),
              (a.beta >= 0 and a.grad_clip > 0 and a.clip_eps > 0, "--beta must be >= 0, --grad-clip and --clip-eps > 0"),
              (a.num_samples >= 2 or (a.reward_norm != "group" and a.algo != "grpo"),
               "per-prompt statistics (--reward-norm group, --algo grpo) need --num-samples >= 2"),
              (a.master_dtype == "fp32" or a.dtype != "fp32", "--master-dtype bf16 computes in bf16: drop --dtype fp32")]
    for ok, msg in checks:
        if not ok:
            die(msg)
    return a


# ----------------------------------------------------------------------------------------------
# 2. Data and rewards
GSM8K_TEMPLATE = '{question} Let\'s think step by step and output the final answer after "####".'
MATH_TEMPLATE = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{question}\n"
                 "Please reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
                 "<|im_start|>assistant\n")


def read_jsonl(path):
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        die(f"cannot read {path}: {getattr(e, 'strerror', None) or e}")
    rows = []
    for n, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line)) if line.strip() else None
        except json.JSONDecodeError as e:
            die(f"{path}:{n} is not valid JSON ({e.msg})")
        if rows and not isinstance(rows[-1], dict):
            die(f"{path}:{n} is not a JSON object")
    if not rows:
        die(f"{path} has no rows")
    return rows


def last_boxed(text):
    """Content of the last \\boxed{...} (or \\fbox{...}), braces matched; None if there is none."""
    i = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if i < 0:
        return None
    j = text.find("{", i)
    if j < 0 or text[i:j].strip() not in ("\\boxed", "\\fbox"):
        m = re.match(r"\\boxed ([^\s$]+)", text[i:])  # "\boxed 2"
        return m.group(1) if m else None
    depth = 0
    for k in range(j, len(text)):
        depth += {"{": 1, "}": -1}.get(text[k], 0)
        if depth == 0:
            return text[j + 1:k]
    return None


def hash_answer(text):
    """The number after the first '#### ' with commas and '$' stripped (the author's strict GSM8K rule)."""
    m = re.search(r"####\s*\$?\s*(-?[\d,]*\.?\d+)", text)
    return m.group(1).replace(",", "").replace("$", "") if m else None


def final_answer(answer):
    """The reference final answer: the number after '####' for a full GSM8K solution, else the answer as given."""
    return (hash_answer(answer) or answer) if "####" in answer else answer


def last_number(text):
    nums = re.findall(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+", text)
    return nums[-1].replace(",", "").rstrip(".") if nums else None


def _problem(row, path):
    q = next((row[k] for k in ("question", "problem", "prompt") if k in row), None)
    if not isinstance(q, str) or "answer" not in row:
        die(f"{path}: every row needs a 'question' (or 'problem'/'prompt') string and an 'answer'")
    return {"question": q, "answer": final_answer(str(row["answer"]))}


def load_problems(dataset, split="train", data_dir=""):
    """Rows {question, answer (the reference final answer)} and the task ('gsm8k' or 'math') that grades them.
    dataset: gsm8k | math-hard (train: MATH levels 3-5 minus MATH-500; test: MATH-500) | math500 | math-hard-l5 | x.jsonl"""
    local = lambda *p: read_jsonl(os.path.join(data_dir, *p))
    if dataset.endswith(".jsonl"):
        return [_problem(r, dataset) for r in read_jsonl(dataset)], "math"
    if dataset == "gsm8k":
        rows = local("gsm8k", f"{split}.jsonl") if data_dir else _hub("openai/gsm8k", "main", split=split)
        return [_problem(r, "gsm8k") for r in rows], "gsm8k"
    if dataset in ("math-hard", "math500", "math-hard-l5"):
        if dataset == "math-hard" and split == "train":  # the author's "MATH HARD" train set
            if data_dir:
                m500 = {r["problem"] for r in local("math", "math500_test.jsonl")}
                rows = local("math", "train.jsonl") + local("math", "test.jsonl")
            else:
                m500 = {r["problem"] for r in _hub("HuggingFaceH4/MATH-500", split="test")}
                rows = [dict(r, level=r["level"].split()[-1]) for s in ("train", "test")
                        for r in _hub("DigitalLearningGmbH/MATH-lighteval", split=s)]
            rows = [r for r in rows if str(r["level"]).isdigit() and int(r["level"]) >= 3 and r["problem"] not in m500]
        elif dataset == "math-hard-l5":
            rows = (local("math", "hard_test.jsonl") if data_dir else
                    [r for r in _hub("DigitalLearningGmbH/MATH-lighteval", split="test") if r["level"] == "Level 5"])
        else:  # math500 and the math-hard eval set
            rows = local("math", "math500_test.jsonl") if data_dir else _hub("HuggingFaceH4/MATH-500", split="test")
        return [{"question": r["problem"], "answer": r.get("answer") or last_boxed(r["solution"]) or ""} for r in rows], "math"
    die(f"unknown dataset {dataset!r}: use gsm8k, math-hard, math500, math-hard-l5 or a .jsonl file")


def _hub(*a, **kw):
    try:
        import datasets
        return list(datasets.load_dataset(*a, **kw))
    except Exception as e:
        die(f"cannot load {a[0]} from the Hugging Face hub ({type(e).__name__}); pass --data-dir DIR for local files")


def default_template(dataset, task):
    return "{question}" if dataset.endswith(".jsonl") else GSM8K_TEMPLATE if task == "gsm8k" else MATH_TEMPLATE


def gsm8k_reward(completion, answer):
    """1.0 iff the number after the first '#### ' equals the reference exactly (the author's strict rule)."""
    ref = hash_answer(answer) if "####" in answer else answer.strip().replace(",", "")
    return float(hash_answer(completion) == ref)


def extract_answer(completion):
    """The grading cascade for free-form answers: last \\boxed{} → '#### n' → last number."""
    return last_boxed(completion) or hash_answer(completion) or last_number(completion)


def math_reward(completion, answer):
    """1.0 iff the extracted answer is math-verify-equal to the reference. A grader error or a
    time-out (parse 5 s + verify 5 s) counts as wrong, never as a hang."""
    pred = extract_answer(completion)
    return float(pred is not None and answers_equal(pred, final_answer(answer)))


def answers_equal(pred, ref):
    if pred.strip() == ref.strip():
        return True
    try:
        from math_verify import parse, verify
        gold, got = (parse(f"\\boxed{{{s}}}", parsing_timeout=5) for s in (ref, pred))
        return bool(gold and got and verify(gold, got, timeout_seconds=5))
    except Exception:
        return False


REWARDS = {"gsm8k": gsm8k_reward, "math": math_reward}


# ----------------------------------------------------------------------------------------------
# 3. E-step: sample N completions per prompt from the frozen θ*
# Why bother: on an H100 (Qwen2.5-1.5B, 256 rows) generate() spends ≈ 88 ms per decode step while reading the
# weights once takes ≈ 1 ms (issue #6's measurement) — the rest is Python, kernel launches and cache copies.
# One loop, two decode steps. `hf`: the model's own forward on a growing DynamicCache — the reference, any
# architecture. `static`: our decode step over the same weights (Qwen2/Llama layout) on a KV cache allocated once
# at full length — every tensor keeps its shape, so `compiled` turns the step into one CUDA graph (torch.compile,
# mode reduce-overhead): no per-layer kernel launches from Python, no cache reallocation. Tested token-equal.
def next_token(logits, temperature, generator=None):
    """Greedy at temperature 0, else an exact sample from softmax(logits / T) by the exponential race:
    argmax(p / E), E ~ Exp(1) (Gumbel-max in disguise) = argmax(logits − T·log E) — no softmax, no multinomial,
    no host sync, and one vocab-sized fp32 tensor (the noise, overwritten in place)."""
    if temperature == 0:
        return logits.argmax(-1)
    noise = torch.empty_like(logits, dtype=torch.float32).exponential_(generator=generator)
    return noise.log_().mul_(-temperature).add_(logits).argmax(-1)


def sampler_mode(model, mode="auto"):
    """auto: compiled on CUDA, static on CPU, hf where our decode step does not know the architecture."""
    c = model.config
    ours = c.model_type in ("qwen2", "llama") and not getattr(c, "use_sliding_window", False)
    if mode == "auto":
        return ("compiled" if model.device.type == "cuda" else "static") if ours else "hf"
    if mode != "hf" and not ours:
        die(f"--sampler {mode} supports qwen2/llama models without sliding window, not {c.model_type!r}; use hf")
    return "static" if mode == "compiled" and getattr(model, "_empg_compile_failed", False) else mode


def rope(x, cos, sin):
    """Rotary position embedding in HF's rotate-half layout."""
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat((-x2, x1), -1) * sin


def decode_step(model, kv, valid, tok, pos, col, width):
    """Next-token logits (R, vocab) for tokens tok (R,) at positions pos (R, 1), written to KV-cache column col
    (a 1-element tensor: the column moves, the graph does not). valid (R, L) marks the cache columns each row may
    attend to — its real prompt tokens and what it has generated so far; attention reads the first `width` columns
    only. Reading the cache, not the weights, dominates a long decode: at 256 rows × 1.5k columns Qwen2.5-1.5B's
    cache is 11 GB against 3 GB of weights, so `width` follows the filled part in steps of 256 (≈ 2× fewer bytes)."""
    m, R = model.model, tok.shape[0]
    x = m.embed_tokens(tok[:, None])                                   # (R, 1, D)
    cos, sin = m.rotary_emb(x, pos)                                    # (R, 1, d): each row at its own position
    valid.index_fill_(1, col, True)
    for layer, (K, V) in zip(m.layers, kv):                            # K, V: (R, KV heads, L, d)
        a, h = layer.self_attn, layer.input_layernorm(x)
        q = rope(a.q_proj(h).view(R, -1, a.head_dim), cos, sin)        # (R, H, d)
        K.index_copy_(2, col, rope(a.k_proj(h).view(R, -1, a.head_dim), cos, sin)[:, :, None])
        V.index_copy_(2, col, a.v_proj(h).view(R, -1, 1, a.head_dim))
        # grouped-query attention without repeating K/V: the H/KV query heads that share a KV head attend as
        # H/KV query rows of it, so each cache entry is read once, not H/KV (= 6 for Qwen2.5-1.5B) times
        o = F.scaled_dot_product_attention(q.view(R, K.shape[1], -1, a.head_dim), K[:, :, :width], V[:, :, :width],
                                           attn_mask=valid[:, None, None, :width], scale=a.scaling)
        x = x + a.o_proj(o.reshape(R, 1, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.get_output_embeddings()(m.norm(x))[:, 0]


def static_cache(model, rows, length, like):
    """K/V buffers (rows, KV heads, ≥ length, d) per layer and the valid mask, allocated once and kept on the model:
    the compiled graph sees the same shapes and addresses at every E-step (length grows in steps of 256 if needed)."""
    c = getattr(model, "_empg_cache", None)
    if c is None or c[1].shape[0] != rows or c[1].shape[1] < length:
        L, kv_heads = -(-length // 256) * 256, like.shape[1]
        kv = [(like.new_zeros(rows, kv_heads, L, like.shape[-1]), like.new_zeros(rows, kv_heads, L, like.shape[-1]))
              for _ in model.model.layers]
        c = model._empg_cache = (kv, torch.zeros(rows, L, dtype=torch.bool, device=like.device))
        for t in (c[1], *[x for pair in kv for x in pair]):
            torch._dynamo.mark_static_address(t)  # CUDA graphs may keep pointers to these
    return c


@torch.no_grad()
def sample(model, prompts, n, max_new_tokens, eos_ids, pad_id, temperature=1.0, generator=None, mode="auto"):
    """Sample n completions for each prompt (lists of token ids). Returns a list of len(prompts)·n token lists,
    row i·n+j the j-th sample of prompt i, each ending at (and including) its first EOS unless truncated.
    Prompts are left-padded so every row's next token sits at the same column; each prompt is prefilled
    once and its KV cache repeated to its n rows. mode: auto | hf | static | compiled (see above)."""
    from transformers import DynamicCache
    mode = sampler_mode(model, mode)
    dev, B, P, T = model.device, len(prompts), max(map(len, prompts)), max_new_tokens
    ids = torch.full((B, P), pad_id, dtype=torch.long, device=dev)
    mask = torch.zeros((B, P), dtype=torch.long, device=dev)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):], mask[i, P - len(p):] = torch.tensor(p, device=dev), 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # positions count real tokens only: left padding changes nothing
    cache = DynamicCache(config=model.config)
    logits = model(ids, mask, pos, cache, logits_to_keep=1).logits[:, -1]  # 4th arg: the KV cache (renamed in 5.x)
    logits, mask, pos = logits.repeat_interleave(n, 0), mask.repeat_interleave(n, 0), pos[:, -1:].repeat_interleave(n, 0)
    if mode == "hf":
        cache.batch_repeat_interleave(n)  # prefill once, share across the n samples
    else:
        kv, valid = static_cache(model, B * n, P + T, cache.layers[0].keys)
        for (K, V), layer in zip(kv, cache.layers):  # prefill once, copy each prompt's K/V to its n rows
            K[:, :, :P], V[:, :, :P] = layer.keys.repeat_interleave(n, 0), layer.values.repeat_interleave(n, 0)
        valid.zero_()[:, :P] = mask.bool()
        col = torch.full((1,), P - 1, device=dev)
        step = torch.compile(decode_step, mode="reduce-overhead", fullgraph=True) if mode == "compiled" else decode_step
    eos = torch.tensor(sorted(eos_ids), device=dev)
    out = torch.full((B * n, T), pad_id, dtype=torch.long, device=dev)
    done = torch.zeros(B * n, dtype=torch.bool, device=dev)
    for t in range(T):
        tok = next_token(logits, temperature, generator).masked_fill(done, pad_id)
        out[:, t] = tok
        done |= torch.isin(tok, eos)
        if t == T - 1 or (t % 8 == 7 and done.all()):  # host sync only every 8 tokens
            break
        pos += 1
        if mode == "hf":
            mask = torch.cat([mask, mask.new_ones(B * n, 1)], 1)
            logits = model(tok[:, None], mask, pos, cache).logits[:, -1]
        else:
            col += 1
            if mode == "compiled":
                torch.compiler.cudagraph_mark_step_begin()  # the last step's logits are consumed: reuse its buffers
            width = min(valid.shape[1], -(-(P + t + 1) // 256) * 256)
            try:
                logits = step(model, kv, valid, tok, pos, col, width)
            except Exception as e:  # torch.compile failed (no Triton, an unsupported op, ...): go on uncompiled
                if step is decode_step:
                    raise
                print(f"empg: warning: torch.compile failed ({type(e).__name__}); sampling with --sampler static",
                      file=sys.stderr)
                model._empg_compile_failed, step = True, decode_step
                logits = step(model, kv, valid, tok, pos, col, width)  # writing the same cache column again is harmless
    completions = []
    for row in out[:, :t + 1].tolist():
        end = next((k + 1 for k, x in enumerate(row) if x in eos_ids), len(row))
        completions.append(row[:end])
    return completions


# ----------------------------------------------------------------------------------------------
# 4. M-step: the loss
def sigmoid_normalize(rewards, norm="batch", group_size=None):
    """R̃ = sigmoid((R − μ)/sqrt(σ² + 1e-8)), μ and unbiased σ² over the batch ('batch', the paper's
    mini-batch) or over each prompt's group of consecutive group_size samples ('group'); 'none' gives R̃ = R.
    All-equal rewards give z = 0 (R̃ = ½), never NaN. Statistics are over sequences; the author's code
    weights them by token count instead — per-sequence keeps R̃ a function of rewards alone."""
    if norm == "none":
        return rewards.float()
    r = rewards.float().reshape(-1, group_size if norm == "group" else rewards.numel())
    var = r.var(dim=1, keepdim=True) if r.shape[1] > 1 else torch.zeros_like(r[:, :1])
    return torch.sigmoid((r - r.mean(dim=1, keepdim=True)) / torch.sqrt(var + 1e-8)).reshape(rewards.shape)


def advantages(rewards, group_size, algo="empg", reward_norm="batch", baseline="half"):
    """EMPG: A = 2(R̃ − b), b = ½ (the author's 2·sigmoid(z) − 1, in [−1, 1]) or b = mean R̃.
    GRPO: A = (R − mean_group) / (std_group + 1e-6)."""
    if algo == "grpo":
        r = rewards.float().reshape(-1, group_size)
        return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-6)).reshape(rewards.shape)
    rt = sigmoid_normalize(rewards, reward_norm, group_size)
    return 2 * (rt - (0.5 if baseline == "half" else rt.mean()))


def _chunk_logprobs(h, y, weight, temperature, with_entropy):
    logits = F.linear(h, weight).float() / temperature  # re-score at the sampling temperature
    lse = logits.logsumexp(-1)
    logp = logits.gather(-1, y[:, None]).squeeze(-1) - lse
    if not with_entropy:
        return logp[:, None]
    return torch.stack([logp, lse - (logits.softmax(-1) * logits).sum(-1)], -1)


def completion_logprobs(model, input_ids, attention_mask, completion_mask, temperature=1.0, chunk=1024,
                        with_entropy=False):
    """log πθ(y_t | x, y_<t) / T-scaled, for each completion token: (B, T) fp32, 0 where completion_mask is 0.
    input_ids = [left-padded prompt | right-padded completion of T columns]; the EOS token is a completion token.
    Memory: logits exist only for real completion tokens, `chunk` tokens at a time, recomputed in backward —
    never the (B × L × vocab) fp32 tensor. With with_entropy, returns (logp, entropy)."""
    T = completion_mask.shape[1]
    pos = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos, use_cache=False,
                logits_to_keep=1, output_hidden_states=True)  # final-norm hidden states; skip the full logits
    sel = completion_mask.bool()
    h, y = out.hidden_states[-1][:, -T - 1:-1][sel], input_ids[:, -T:][sel]  # state t predicts token t+1
    w = model.get_output_embeddings().weight
    parts = [checkpoint(_chunk_logprobs, h[i:i + chunk], y[i:i + chunk], w, temperature, with_entropy,
                        use_reentrant=False) for i in range(0, len(y), chunk)]
    flat = torch.cat(parts) if parts else h.new_zeros(0, 2 if with_entropy else 1, dtype=torch.float32)
    res = [flat.new_zeros(sel.shape).masked_scatter(sel, flat[:, k]) for k in range(flat.shape[1])]
    return tuple(res) if with_entropy else res[0]


def seq_mean(x, mask):
    """Mean over each sequence's completion tokens → (B,)."""
    return (x * mask).sum(-1) / mask.sum(-1).clamp(min=1)


# Loss aggregation: per-sequence token mean, then mean over sequences (Eq. 12's E_τ weighs every trajectory
# equally; the token mean keeps one long rambling completion from outweighing short correct ones).
def empg_loss(logp, mask, adv):
    """L = −mean_τ [ mean_t A(τ) log πθ(y_t) ] (Eq. 12): plain REINFORCE on smoothed rewards — no ratio, no clip."""
    return -seq_mean(adv[:, None] * logp, mask).mean()


def grpo_loss(logp, old_logp, mask, adv, clip_eps=0.2):
    """PPO-clip surrogate with importance ratio ρ = πθ/πθ*: −mean_τ mean_t min(ρA, clip(ρ, 1±ε)A)."""
    ratio = torch.exp(logp - old_logp)
    surr = torch.minimum(ratio * adv[:, None], ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv[:, None])
    return -seq_mean(surr, mask).mean()


def kl_k3(logp, ref_logp):
    """Per-token k3 estimator of KL(πθ‖π_ref): exp(r) − r − 1, r = ref − logp (≥ 0, unbiased)."""
    r = ref_logp - logp
    return torch.exp(r) - r - 1


def stochastic_round(x, generator=None):
    """fp32 → bf16, rounding up with probability equal to the remainder, so E[result] = x. bf16 is the top half of
    an fp32's bits: add uniform noise to the 16 bits that get cut, then cut them."""
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    return ((x.view(torch.int32) + noise) & -65536).view(torch.float32).to(torch.bfloat16)


class AdamWSR(torch.optim.Optimizer):
    """AdamW for bf16 master weights (--master-dtype bf16): weights, grads and both moments in bf16 — 8 bytes a
    parameter, not 16 (+2 for a bf16 sampler copy): Qwen2.5-7B (7.6B) needs 61 GB, not 137, so it fits one 80 GB GPU.
    Each update is computed in fp32 and stochastically rounded back: round-to-nearest would erase every step under
    half a bf16 spacing — at lr = 1e-6 that is all of them (the spacing near 0.02 is 1.2e-4) — while stochastic
    rounding keeps them on average. On fp32 weights this is plain AdamW."""

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, seed=0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.seed = seed

    @torch.no_grad()
    def step(self, closure=None):
        gen, chunk = None, 1 << 24  # fp32 temporaries for 16M values at a time, not a whole 545M-row embedding
        for group in self.param_groups:
            (b1, b2), lr, eps, wd = group["betas"], group["lr"], group["eps"], group["weight_decay"]
            for p in (p for p in group["params"] if p.grad is not None):
                st = self.state[p]
                if not st:
                    st.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                t = int(st["step"].add_(1))
                if gen is None:  # noise is a function of (seed, step): a resumed run rounds exactly as before
                    gen = torch.Generator(p.device).manual_seed(self.seed * 1_000_003 + t)
                rnd = (lambda x: stochastic_round(x, gen)) if p.dtype == torch.bfloat16 else (lambda x: x)
                for w, g, m, v in zip(*(x.view(-1).split(chunk) for x in (p, p.grad, st["exp_avg"], st["exp_avg_sq"]))):
                    g, m32, v32 = g.float(), m.float(), v.float()
                    m32.lerp_(g, 1 - b1)
                    v32.mul_(b2).addcmul_(g, g, value=1 - b2)
                    m.copy_(rnd(m32))  # the moments are rounded stochastically too: v's 0.1 % steps (1 − β2)
                    v.copy_(rnd(v32))  # are below half a bf16 spacing (0.4 %) and would stall it
                    upd = (m32 / (1 - b1 ** t)) / ((v32 / (1 - b2 ** t)).sqrt_() + eps)
                    w.copy_(rnd(w.float().mul_(1 - lr * wd).sub_(lr * upd)))


def collate(prompts, completions, pad_id, device):
    """[left-padded prompt | right-padded completion] ids, attention mask and completion mask."""
    P, T = max(map(len, prompts)), max(max(map(len, completions)), 1)
    ids = torch.full((len(prompts), P + T), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, P - len(p):P + len(c)] = torch.tensor(p + c)
        attn[i, P - len(p):P + len(c)] = 1
    return ids.to(device), attn.to(device), attn[:, P:].float().to(device)


# ----------------------------------------------------------------------------------------------
# 5. Training loop
def load_model(name, device, dtype=torch.float32):
    from transformers import AutoConfig, AutoModelForCausalLM
    if (os.path.isabs(name) or name.startswith(".")) and not os.path.isdir(name):
        die(f"cannot load model {name!r}: no such directory")
    try:
        if os.path.isdir(name) and not any(f.endswith((".safetensors", ".bin")) for f in os.listdir(name)):
            cfg = AutoConfig.from_pretrained(name)  # config-only dir: random weights (benchmarks, tests)
            torch.manual_seed(0)
            return AutoModelForCausalLM.from_config(cfg, dtype=dtype).to(device)
        return AutoModelForCausalLM.from_pretrained(name, dtype=dtype).to(device)
    except Exception as e:
        die(f"cannot load model {name!r}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")


def load_tokenizer(name):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as e:
        die(f"cannot load tokenizer {name!r}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")


def stop_ids(tok, model, template):
    """Every id that ends a completion: the tokenizer's and the model's EOS, plus <|im_end|> for chat markup."""
    ids = {tok.eos_token_id}
    for src in (model.config, getattr(model, "generation_config", None)):
        e = getattr(src, "eos_token_id", None)
        ids |= set(e if isinstance(e, list) else [e])
    if "<|im_end|>" in template and "<|im_end|>" in tok.get_vocab():
        ids.add(tok.convert_tokens_to_ids("<|im_end|>"))
    return {i for i in ids if i is not None}


def step_prompts(step, n_rows, k, seed):
    """Row indices for a step: consecutive slices of a fresh permutation per epoch — a pure function of
    (seed, step), so a resumed run sees the same data order."""
    perms = {}  # one permutation per epoch touched, not one per prompt
    perm = lambda e: perms.setdefault(e, torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed + e)))
    return [perm(j // n_rows)[j % n_rows].item() for j in range(step * k, step * k + k)]


def sampler_flag(args):
    """--sampler auto, except with bf16 master weights: there the KV cache is freed after each E-step (memory for
    the gradients) and a CUDA graph needs its cache to stay put, so auto means static."""
    return "static" if args.sampler == "auto" and args.master_dtype == "bf16" else args.sampler


def optimizer(policy, args, dev):
    if args.master_dtype == "bf16":
        return AdamWSR(policy.parameters(), lr=args.lr, weight_decay=args.weight_decay, seed=args.seed)
    return torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                             **({"fused": True} if dev.type == "cuda" else {}))  # fused: one kernel for all params


def setup(args):
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        die("--device cuda but no CUDA GPU is visible")
    bf16_master = getattr(args, "master_dtype", "fp32") == "bf16"  # (eval.py shares this function, without the flag)
    bf16 = args.dtype == "bf16" or (args.dtype == "auto" and (dev.type == "cuda" or bf16_master))
    if bf16 and dev.type == "cpu" and not torch.cpu._is_avx512_bf16_supported() and not bf16_master:
        die("--dtype bf16 on a CPU without native bf16 (AVX512-BF16); use --dtype fp32")
    return dev, torch.bfloat16 if bf16 else torch.float32


# Many GPUs: `torchrun --nproc-per-node G empg.py ...` runs G copies of this file. Each samples its share of the
# step's prompts with a full bf16 θ*; the M-step shards parameters, grads and AdamW state with FSDP2.
# Plain `python empg.py` never initializes a process group and skips every `if world > 1` below.
def init_distributed(args):
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return 0, 1
    world = int(os.environ["WORLD_SIZE"])
    if args.prompts_per_step % world:
        die(f"--prompts-per-step {args.prompts_per_step} is not divisible by the {world} processes")
    if torch.cuda.is_available() and args.device != "cpu":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if torch.cuda.is_available() and args.device != "cpu" else "gloo")
    return dist.get_rank(), world


def gather_all(xs):
    """Concatenate a per-process list over all processes, in rank order (= the one-process order)."""
    if not dist.is_initialized():
        return xs
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, xs)
    return [x for o in out for x in o]


def shard(model, dtype):
    """FSDP2: each decoder layer and the root become a shard group; bf16 compute, fp32 master and grad reduction."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    import warnings  # FSDP2 warns that HF outputs are views; nothing here modifies them in place
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for layer in model.base_model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)


def train(args):
    rank, world = init_distributed(args)
    dev, dtype = setup(args)
    rows, task = load_problems(args.dataset, "train", args.data_dir)
    template = args.prompt_template or default_template(args.dataset, task)
    out_dir = args.output_dir or os.path.join("runs", f"{os.path.basename(args.model.rstrip('/'))}-"
                                              f"{os.path.basename(args.dataset)}-{args.algo}")
    ckpt = latest_checkpoint(out_dir) if args.resume else None
    if args.resume and ckpt is None:
        die(f"--resume: no checkpoint with trainer_state.pt in {out_dir}")
    bf16_master = args.master_dtype == "bf16"
    if world > 1 and bf16_master:
        die("--master-dtype bf16 is for one process; with torchrun, FSDP2 shards the fp32 master weights instead")
    master = torch.bfloat16 if bf16_master else torch.float32
    policy = load_model(ckpt or args.model, dev, master)  # fp32 master weights: a 1e-6 step on bf16 would round away
    tok = load_tokenizer(args.tokenizer or args.model)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    eos_ids = stop_ids(tok, policy, template)
    if args.gradient_checkpointing == "on" or (args.gradient_checkpointing == "auto" and dev.type == "cuda"):
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy.config.use_cache = False
    # θ*: the sampler is a frozen low-precision copy refreshed after every step (one process computing in the master
    # dtype: the policy itself, unchanged until the M-step — no copy)
    sampler = (copy.deepcopy(policy).to(dtype).eval().requires_grad_(False) if dtype != master or world > 1 else policy)
    ref = (copy.deepcopy(sampler) if ckpt is None else load_model(args.model, dev, dtype)).eval().requires_grad_(False) \
        if args.beta > 0 else None
    if world > 1:
        shard(policy, dtype)
    opt = optimizer(policy, args, dev)
    start = 0
    if ckpt:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        state = torch.load(os.path.join(ckpt, "trainer_state.pt"), map_location="cpu", weights_only=False)
        set_optimizer_state_dict(policy, opt, state["optimizer"], options=StateDictOptions(full_state_dict=True))
        start = state["step"]
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        truncate_log(os.path.join(out_dir, "metrics.jsonl"), start)
        truncate_log(os.path.join(out_dir, "samples.jsonl"), start)
        with open(os.path.join(out_dir, "args.json"), "w") as f:
            json.dump(asdict(args), f, indent=1)
    autocast = (lambda: torch.autocast(dev.type, dtype=dtype)) if dtype != torch.float32 else contextlib.nullcontext
    ctx = dict(args=args, dev=dev, autocast=autocast, pad_id=pad_id, ref=ref)
    k = args.prompts_per_step // world  # this process's prompts

    from tqdm import tqdm
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc=args.algo, dynamic_ncols=True,
               disable=rank != 0)
    step = start
    try:
        for step in bar:
            # E-step (Algorithm 1): θ* ← θ; τ ~ Pθ*(τ | x), N samples per prompt
            t0 = time.time()
            if sampler is not policy:
                with torch.no_grad():
                    for ps, p in zip(sampler.parameters(), policy.parameters()):
                        ps.copy_(p.full_tensor() if world > 1 else p)  # FSDP2: all-gather the full weight
            idx = step_prompts(step, len(rows), args.prompts_per_step, args.seed)[rank * k:(rank + 1) * k]
            batch = [rows[i] for i in idx]
            prompts = [tok(template.replace("{question}", r["question"]), add_special_tokens=False)["input_ids"]
                       for r in batch]
            g = torch.Generator(dev).manual_seed(args.seed * 1_000_003 + step * 1009 + rank)  # per-step RNG: exact resume
            comps = sample(sampler, prompts, args.num_samples, args.max_new_tokens, eos_ids, pad_id,
                           args.temperature, g, sampler_flag(args))
            if bf16_master:  # 7B on one GPU: the KV cache (≈ 20 GB at 256 × 1.5k tokens) makes room for the gradients
                sampler.__dict__.pop("_empg_cache", None)
            texts = tok.batch_decode(comps, skip_special_tokens=True)
            answers = [r["answer"] for r in batch for _ in range(args.num_samples)]
            # Reward R(τ) ∈ {0,1}: the final answer is correct (a truncated completion is graded as it stands)
            local = [REWARDS[task](c, a) for c, a in zip(texts, answers)]
            rewards = torch.tensor(gather_all(local))  # the whole batch: R̃'s statistics match one process
            adv_all = advantages(rewards, args.num_samples, args.algo, args.reward_norm, args.baseline)
            adv = adv_all[rank * len(comps):(rank + 1) * len(comps)]
            estep_s = time.time() - t0
            # M-step (Eq. 12): ascend Σ A(τ) ∇ log Pθ(τ) with the samples of θ*, then discard them
            t1 = time.time()
            stats = m_step(policy, opt, [p for p in prompts for _ in range(args.num_samples)], comps, adv, ctx)
            mstep_s = time.time() - t1
            lens = gather_all([len(c) for c in comps])
            truncated = gather_all([len(c) == args.max_new_tokens and c[-1] not in eos_ids for c in comps])
            n_prompt = sum(gather_all([len(p) * args.num_samples for p in prompts]))
            stats = {key: sum(v) / world for key, v in zip(stats, zip(*gather_all([list(stats.values())])))} \
                if world > 1 else stats
            m = dict(step=step + 1, reward_mean=rewards.mean().item(),
                     reward_std=rewards.std().item() if len(rewards) > 1 else 0.0, adv_abs_mean=adv_all.abs().mean().item(),
                     **stats, response_len_mean=sum(lens) / len(lens), truncated_frac=sum(truncated) / len(lens),
                     estep_s=estep_s, mstep_s=mstep_s, estep_tok_s=sum(lens) / estep_s,
                     mstep_tok_s=(n_prompt + sum(lens)) * args.updates_per_batch / mstep_s, lr=args.lr)
            if rank == 0:
                append_jsonl(os.path.join(out_dir, "metrics.jsonl"), [m])
                every = max(1, len(texts) // max(args.log_samples, 1))
                append_jsonl(os.path.join(out_dir, "samples.jsonl"),
                             [dict(step=step + 1, prompt=tok.decode(prompts[i // args.num_samples]),
                                   completion=texts[i], answer=answers[i], reward=local[i])
                              for i in range(0, len(texts), every)][:args.log_samples])
            bar.set_postfix(reward=f"{m['reward_mean']:.3f}", len=f"{m['response_len_mean']:.0f}",
                            tok_s=f"{m['estep_tok_s']:.0f}", loss=f"{m['loss']:.4f}")
            if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
                save_checkpoint(out_dir, policy, tok, opt, step + 1, args, rank)
    except KeyboardInterrupt:  # nothing lost on Ctrl-C: keep the finished steps
        if step > start and world == 1:
            save_checkpoint(out_dir, policy, tok, opt, step, args, rank)
        print(f"\ninterrupted; saved step {step} to {out_dir}; continue with --resume", file=sys.stderr)
        sys.exit(130)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return out_dir


def micro_batches(prompts, comps, size, tokens=0):
    """Indices of the sequences, longest first, cut into micro-batches of `size` — or, with tokens > 0, each as
    large as fits count × padded length ≤ tokens (after left-padding prompts and right-padding completions)."""
    order = sorted(range(len(comps)), key=lambda i: len(prompts[i]) + len(comps[i]), reverse=True)
    mbs = [[]]
    for i in order:
        grown = mbs[-1] + [i]
        padded = len(grown) * (max(len(prompts[j]) for j in grown) + max(len(comps[j]) for j in grown))
        if len(grown) == 1 or (padded <= tokens if tokens else len(grown) <= size):
            mbs[-1] = grown
        else:
            mbs.append([i])
    return mbs


def m_step(policy, opt, prompts, comps, adv, ctx):
    """`updates_per_batch` optimizer steps on one E-step buffer, in length-sorted micro-batches."""
    args, dev = ctx["args"], ctx["dev"]
    S = len(comps)
    mbs = micro_batches(prompts, comps, args.micro_batch_size, args.micro_batch_tokens)
    old = {}  # θ*'s log-probs for the GRPO ratio: the first pass runs at θ = θ*, so they come for free
    policy.train()
    for k in range(args.updates_per_batch):
        tot = dict(loss=0.0, kl=0.0, entropy=0.0, clip_frac=0.0)  # summed on the GPU: no host sync per micro-batch
        for j, mb in enumerate(mbs):
            ids, attn, cmask = collate([prompts[i] for i in mb], [comps[i] for i in mb], ctx["pad_id"], dev)
            a = adv[mb].to(dev)
            with ctx["autocast"]():
                res = completion_logprobs(policy, ids, attn, cmask, args.temperature, args.logprob_chunk,
                                          with_entropy=args.entropy_coef > 0)
            logp, ent = res if args.entropy_coef > 0 else (res, None)
            if k == 0:
                old[j] = logp.detach()
            w = len(mb) / S  # micro-batch losses are means; weight them so the sum is the batch mean
            if args.algo == "grpo":
                loss = grpo_loss(logp, old[j], cmask, a, args.clip_eps)
                ratio = torch.exp(logp.detach() - old[j])
                tot["clip_frac"] += w * seq_mean(((ratio - 1).abs() > args.clip_eps).float(), cmask).mean()
            else:
                loss = empg_loss(logp, cmask, a)
            if ctx["ref"] is not None:
                with torch.no_grad(), ctx["autocast"]():
                    ref_logp = completion_logprobs(ctx["ref"], ids, attn, cmask, args.temperature, args.logprob_chunk)
                kl = seq_mean(kl_k3(logp, ref_logp), cmask).mean()
                loss = loss + args.beta * kl
                tot["kl"] += w * kl.detach()
            if ent is not None:
                e = seq_mean(ent, cmask).mean()
                loss = loss - args.entropy_coef * e
                tot["entropy"] += w * e.detach()
            (loss * w).backward()
            tot["loss"] += w * loss.detach()
        tot = {key: float(v) for key, v in tot.items()}
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.grad_clip)
        grad_norm = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()
        skipped = not (math.isfinite(tot["loss"]) and math.isfinite(grad_norm))
        if not skipped:  # a non-finite loss skips the step (logged) instead of poisoning the weights
            opt.step()
        opt.zero_grad(set_to_none=True)
    return dict(tot, grad_norm=grad_norm, skipped=int(skipped))


# ----------------------------------------------------------------------------------------------
# 6. Checkpoints and logs
def save_checkpoint(out_dir, policy, tok, opt, step, args, rank=0):
    """HF save_pretrained dir (loadable by transformers and eval.py) + full optimizer state for --resume with any
    number of processes. Written to a temp dir and renamed, so a crash mid-save never leaves a half checkpoint;
    older checkpoints keep their weights but drop the optimizer state."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    o = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathers FSDP2 shards (a collective)
    model_sd, opt_sd = get_model_state_dict(policy, options=o), get_optimizer_state_dict(policy, opt, options=o)
    if rank == 0:
        final, tmp = os.path.join(out_dir, f"checkpoint-{step:06d}"), os.path.join(out_dir, f".tmp-checkpoint-{step:06d}")
        shutil.rmtree(tmp, ignore_errors=True)
        policy.save_pretrained(tmp, state_dict=model_sd)
        tok.save_pretrained(tmp)
        torch.save({"optimizer": opt_sd, "step": step, "args": asdict(args)}, os.path.join(tmp, "trainer_state.pt"))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for d in os.listdir(out_dir):
            p = os.path.join(out_dir, d, "trainer_state.pt")
            if d.startswith("checkpoint-") and d != os.path.basename(final) and os.path.exists(p):
                os.remove(p)
    if dist.is_initialized():
        dist.barrier()


def latest_checkpoint(out_dir):
    ok = [d for d in sorted(os.listdir(out_dir)) if d.startswith("checkpoint-")
          and os.path.exists(os.path.join(out_dir, d, "trainer_state.pt"))] if os.path.isdir(out_dir) else []
    return os.path.join(out_dir, ok[-1]) if ok else None


def append_jsonl(path, rows):
    with open(path, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def truncate_log(path, step):
    """On resume, drop log rows past the checkpoint so the log matches an uninterrupted run."""
    if os.path.exists(path):
        keep = [l for l in open(path) if l.strip() and json.loads(l)["step"] <= step]
        with open(path, "w") as f:
            f.writelines(keep)


# ----------------------------------------------------------------------------------------------
# 7. Benchmark: where does the time go? (`--benchmark`; random prompts, so a config-only --model dir is enough)
def benchmark(args):
    dev, dtype = setup(args)
    policy = load_model(args.model, dev, torch.bfloat16 if args.master_dtype == "bf16" else torch.float32)
    sampler = copy.deepcopy(policy).to(dtype).eval().requires_grad_(False) if dtype != policy.dtype else policy
    if dev.type == "cuda":
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    g = torch.Generator().manual_seed(args.seed)
    vocab = min(policy.config.vocab_size, 151643)  # stay below Qwen's special tokens
    prompts = [torch.randint(0, vocab, (int(torch.randint(64, 129, (1,), generator=g)),), generator=g).tolist()
               for _ in range(args.prompts_per_step)]
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    n, T, res = args.num_samples, args.max_new_tokens, {}

    def timed(fn):
        sync(); t = time.time(); out = fn(); sync()
        return out, time.time() - t

    # E-step, every row decoded to the full length (no EOS) so both sides do the same work. Our first call also
    # allocates the KV cache (and compiles, for --sampler compiled); the second is the steady state of a run.
    ours = lambda: sample(sampler, prompts, n, T, set(), 0, args.temperature, torch.Generator(dev).manual_seed(0),
                          sampler_flag(args))
    _, res["ours_first_s"] = timed(ours)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    comps, res["ours_s"] = timed(ours)
    if dev.type == "cuda":
        res["estep_peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if args.master_dtype == "bf16":  # as in train()
        sampler.__dict__.pop("_empg_cache", None)
    sampler.generate(torch.tensor([prompts[0]], device=dev), max_new_tokens=2, do_sample=False, pad_token_id=0)
    P = max(map(len, prompts))
    ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts], device=dev)
    gen = lambda: sampler.generate(ids, attention_mask=(torch.arange(P, device=dev) >= P - torch.tensor(
        [len(p) for p in prompts], device=dev)[:, None]).long(), do_sample=True, temperature=args.temperature, top_k=0,
        top_p=1.0, max_new_tokens=T, min_new_tokens=T, num_return_sequences=n, pad_token_id=0)
    _, res["generate_s"] = timed(gen)
    tokens = len(prompts) * n * T
    res.update(ours_tok_s=tokens / res["ours_s"], generate_tok_s=tokens / res["generate_s"],
               speedup=res["generate_s"] / res["ours_s"])
    # M-step: one optimizer step on those samples
    opt = optimizer(policy, args, dev)
    autocast = (lambda: torch.autocast(dev.type, dtype=dtype)) if dtype != torch.float32 else contextlib.nullcontext
    ctx = dict(args=args, dev=dev, autocast=autocast, pad_id=0, ref=None)
    adv = torch.randn(len(comps))
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _, res["mstep_s"] = timed(lambda: m_step(policy, opt, [p for p in prompts for _ in range(n)], comps, adv, ctx))
    m_tokens = (sum(map(len, prompts)) * n + tokens) * args.updates_per_batch
    res["mstep_tok_s"] = m_tokens / res["mstep_s"]
    if dev.type == "cuda":  # matmul flops per token and weight: 2 forward + 2 checkpointed recompute + 4 backward = 8;
        # the decoder runs on every token, the vocab projection on completion tokens only, the embedding is a lookup.
        # Attention's own flops (a few % at these lengths) are left out. Peak: H100 bf16 dense, 989 TFLOP/s.
        body = sum(p.numel() for name, p in policy.named_parameters() if "embed_tokens" not in name and "lm_head" not in name)
        head = policy.get_output_embeddings().weight.numel()
        res["mfu"] = 8 * (body * m_tokens + head * tokens * args.updates_per_batch) / res["mstep_s"] / 989e12
        res["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    # the paper's run is --steps E-steps + M-steps of this shape; rows decoded to the cap make it an upper bound
    res["projected_run_h"] = args.steps * (res["ours_s"] + res["mstep_s"]) / 3600
    res.update(sampler=sampler_mode(sampler, sampler_flag(args)), master_dtype=args.master_dtype, model=args.model,
               device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", prompts=len(prompts),
               num_samples=n, max_new_tokens=T, micro_batch_size=args.micro_batch_size,
               micro_batch_tokens=args.micro_batch_tokens)
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    a = parse_args()
    benchmark(a) if a.benchmark else train(a)
