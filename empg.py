"""EM Policy Gradient (EMPG): train an LLM to reason, in one file.

Tianbing Xu, "Training Large Language Models to Reason via EM Policy Gradient" (arXiv 2504.18587).
Algorithm 1, line by line, and the function that computes it (in Part I, unless marked II):
  for each step:                                            train()
    θ* ← θ  (freeze the weights that sample)                  sync_theta_star() II
    E-step: N completions τ ~ Pθ*(τ | x) per prompt, T = 1    sample(), next_token()
    R(τ) ∈ {0, 1}: is the final answer right?                gsm8k_reward(), math_reward()
    R̃ = sigmoid((R − μ)/σ),  A = 2(R̃ − ½)                    sigmoid_normalize(), advantages()
    M-step: ascend E_τ~θ*[A(τ) ∇ log Pθ(τ)]  (Eq. 12)        completion_logprobs(), empg_loss(), m_step()
  every K steps: the greedy test score                      evaluate() II
`--algo grpo` is the paper's comparator: the grpo branch of advantages(), and grpo_loss().

    python empg.py --model Qwen/Qwen2.5-1.5B                       # GSM8K, the author's job
    python empg.py --model Qwen/Qwen2.5-1.5B --dataset math-hard   # MATH levels 3-5
"""

import argparse, contextlib, fcntl, functools, json, math, os, re, shutil, signal, socket, sys
import threading, time
from dataclasses import asdict, dataclass, field, fields
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# ==================================================================================================
# PART I — ALGORITHM 1
# ==================================================================================================


# ---- Arguments (`python empg.py --help`; the README's table gives each default's source)
def arg(default, help, choices=""):
    kind = type(default) if default is not None else int  # None: the dataset's preset (PRESETS)
    return field(default=default, metadata=dict(help=help, choices=choices.split(), kind=kind))


NORMS = "token batch group none"  # none: R̃ = R


@dataclass
class Args:
    # algorithm
    algo: str = arg("empg", "empg (Eq. 12), or grpo (the paper's comparator)", "empg grpo")
    reward_norm: str = arg("token", "R̃'s μ, σ over: response tokens (author's code), responses "
                           "(paper's text), each prompt's N", NORMS)  # fmt: skip
    baseline: str = arg("half", "b in A = 2(R̃ − b): ½ (author's 2σ(z) − 1) or mean R̃", "half mean")
    beta: float = arg(0.0, "β · KL(πθ‖π_init), k3 clamped to ±10 (author's 1.5B GSM8K job: 0.001)")
    entropy_coef: float = arg(0.0, "entropy bonus (author's 1.5B GSM8K job: 0.001)")
    clip_eps: float = arg(0.2, "PPO clip ε (grpo only)")
    updates_per_batch: int = arg(1, "optimizer steps per E-step (paper: 1)")
    # data and E-step
    model: str = arg("Qwen/Qwen2.5-1.5B", "hub name or local dir (config only: random weights)")
    tokenizer: str = arg("", "hub name or local dir (default: --model)")
    dataset: str = arg("gsm8k", "gsm8k, math-hard, or a .jsonl of {question, answer} rows")
    data_dir: str = arg("", "local folder laid out like ../shared/data (default: the hub)")
    prompt_template: str = arg("", "prompt with a {question} placeholder (default: the dataset's)")
    max_prompt_chars: int = arg(None, "drop longer prompts, train and test (author's jobs: gsm8k "
                                "512, math-hard 1024; ours: 0 = none)")  # fmt: skip
    steps: int = arg(None, "optimizer steps (default: one epoch, drop-last; GSM8K: 225)")
    prompts_per_step: int = arg(32, "prompts per E-step (the author's jobs: 32)")
    num_samples: int = arg(
        None, "N completions per prompt (author's jobs: gsm8k 2, math-hard 8; ours: 8)"
    )
    max_new_tokens: int = arg(None, "completion cap (gsm8k 1024: author's job; math-hard 3072: "
                              "paper's text; ours: 1024)")  # fmt: skip
    temperature: float = arg(1.0, "sampling temperature; pure sampling, no top-k/top-p")
    # M-step: AdamW, constant lr, no warmup (the author's jobs)
    lr: float = arg(1e-6, "learning rate")
    weight_decay: float = arg(0.01, "AdamW weight decay")
    grad_clip: float = arg(1.0, "global grad-norm clip")
    # speed and memory: the results do not change
    sampler: str = arg("auto", "E-step decoder (make_decoder)", "auto compiled static hf")
    micro_batch_size: int = arg(8, "sequences per M-step forward/backward")
    micro_batch_tokens: int = arg(0, "if > 0: micro-batches of count × padded length ≤ this")
    logprob_chunk: int = arg(1024, "tokens per chunk of the vocab projection")
    gradient_checkpointing: str = arg(
        "auto", "recompute activations (auto: on CUDA)", "auto on off"
    )
    dtype: str = arg("auto", "compute dtype (auto: bf16 on CUDA)", "auto bf16 fp32")
    master_dtype: str = arg("fp32", "weights, AdamW state (bf16: stochastic rounding)", "fp32 bf16")
    device: str = arg("auto", "auto, cuda, cuda:N or cpu (≥ 1B parameters on a CPU: say cpu)")
    # evaluation: the paper's test score
    eval_every: int = arg(5, "greedy test score at step 0, every K steps and at the end (0: off)")
    eval_limit: int = arg(0, "the first N held-out problems only (0: all)")
    eval_dataset: str = arg("", "held-out set (default: the dataset's test set; none for .jsonl)")
    # I/O
    seed: int = arg(0, "data order and sampling")
    output_dir: str = arg("", "the run's dir (default: runs/<model>-<dataset>-<algo>)")
    save_every: int = arg(50, "checkpoint every K steps (and at the end, and on Ctrl-C)")
    log_samples: int = arg(4, "completions per step written to samples.jsonl")
    resume: bool = arg(False, "continue the run in --output-dir from its latest checkpoint")
    overwrite: bool = arg(False, "delete what --output-dir holds and start afresh")
    benchmark: bool = arg(False, "time an E-step (and generate()) and an M-step; print JSON")


# The author's launched jobs (../shared/reference/paper.md; math-hard's 3072 is the paper's text,
# the 1.5B job had 2048). Any other dataset gets OURS; a flag overrides either.
PRESETS = {
    "gsm8k": dict(num_samples=2, max_new_tokens=1024, max_prompt_chars=512),
    "math-hard": dict(num_samples=8, max_new_tokens=3072, max_prompt_chars=1024),
}
OURS = dict(num_samples=8, max_new_tokens=1024, max_prompt_chars=0)


# ---- Data and graders: load_problems() (Part II) gives rows {question, answer}
GSM8K_TEMPLATE = '{question} Let\'s think step by step and output the final answer after "####".'
MATH_TEMPLATE = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{question}\n"
    "Please reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def hash_answer(text):
    """The author's strict GSM8K rule: the first match of `#### (-?[0-9.,]+)`, one space exactly,
    ',' and '$' stripped. '#### 18.' gives '18.' (≠ '18'); '####18', '#### $18' give None."""
    m = re.search(r"#### (\-?[0-9\.\,]+)", text)
    return m.group(1).replace(",", "").replace("$", "") if m else None


def final_answer(answer):
    """The reference: the number after '####' of a GSM8K solution, else the answer as given."""
    return (hash_answer(answer) or answer.split("####")[-1].strip()) if "####" in answer else answer


def gsm8k_reward(completion, answer):
    """1.0 iff the strict rule reads the reference number (a string compare, as the author's)."""
    return float(hash_answer(completion) == final_answer(answer).replace(",", ""))


def math_reward(completion, answer, verify=True):
    """1.0 iff the extracted answer (last \\boxed{} → '####' → last number) is math-verify-equal
    to the reference; a grader error or time-out counts as wrong (verify=False: equal strings)."""
    pred = extract_answer(completion)
    return float(pred is not None and answers_equal(pred, final_answer(answer), verify))


REWARDS = {"gsm8k": gsm8k_reward, "math": math_reward}


# ---- E-step: N completions per prompt from the frozen θ*
def next_token(logits, temperature, generator=None):
    """Greedy at temperature 0, else an exact sample from softmax(logits / T) by the exponential
    race argmax(p / E), E ~ Exp(1), = argmax(logits − T·log E): no softmax, no multinomial."""
    if temperature == 0:
        return logits.argmax(-1)
    noise = torch.empty_like(logits, dtype=torch.float32).exponential_(generator=generator)
    return noise.log_().mul_(-temperature).add_(logits).argmax(-1)


class PlainDecoder:
    """The reference decode step: the model's own forward on a growing KV cache, any architecture.
    Part II's StaticDecoder computes the same (tested token-equal) on a cache allocated once."""

    def __init__(self, model):
        self.model = model

    def prefill(self, ids, mask, n, max_new_tokens):
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # positions count real tokens only
        logits = self.model(ids, mask, pos, self.cache, logits_to_keep=1).logits[:, -1]
        self.cache.batch_repeat_interleave(n)  # each prompt prefilled once, its K/V shared n ways
        self.mask, self.pos = mask.repeat_interleave(n, 0), pos[:, -1:].repeat_interleave(n, 0)
        return logits.repeat_interleave(n, 0)

    def decode(self, tok):
        self.pos = self.pos + 1
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(tok), 1)], 1)
        return self.model(tok[:, None], self.mask, self.pos, self.cache).logits[:, -1]

    def make_room(self):  # before the M-step: this cache is rebuilt at every prefill anyway
        self.cache = None


@torch.no_grad()
def sample(theta_star, prompts, n, max_new_tokens, eos_ids, pad_id, temperature=1.0,
           generator=None, decoder="auto"):  # fmt: skip
    """n completions (token ids) per prompt from θ*: row i·n + j is prompt i's j-th sample, ending
    with its first EOS unless cut at max_new_tokens. Prompts are left-padded, so every row's next
    token sits in the same column. decoder: a decoder, or a --sampler name (make_decoder)."""
    decoder = make_decoder(theta_star, decoder) if isinstance(decoder, str) else decoder
    dev, T = theta_star.device, max_new_tokens
    logits = decoder.prefill(*left_pad(prompts, pad_id, dev), n, T)
    eos = torch.tensor(sorted(eos_ids), device=dev)
    out = torch.full((len(logits), T), pad_id, dtype=torch.long, device=dev)
    done = torch.zeros(len(logits), dtype=torch.bool, device=dev)
    for t in range(T):
        tok = next_token(logits, temperature, generator).masked_fill(done, pad_id)
        out[:, t] = tok
        done |= torch.isin(tok, eos)
        if t == T - 1 or (t % 8 == 7 and done.all()):  # "all done?" costs a sync: every 8th token
            break
        logits = decoder.decode(tok)
    rows = out[:, : t + 1].tolist()
    return [r[: next((k + 1 for k, x in enumerate(r) if x in eos_ids), len(r))] for r in rows]


# ---- Reward → R̃ → advantages
def sigmoid_normalize(rewards, norm="batch", group_size=None, lengths=None):
    """R̃ = sigmoid((R − μ)/sqrt(σ² + 1e-8)), σ² unbiased, with μ, σ² over: 'token', every response
    token of the batch, each carrying its response's reward (the author's code: long responses
    weigh more); 'batch', the responses (the paper's text); 'group', each prompt's group_size
    samples. 'none': R̃ = R. All-equal rewards give z = 0 (R̃ = ½), never NaN."""
    r = rewards.float()
    if norm == "none":
        return r
    if norm == "token":
        w = torch.ones_like(r) if lengths is None else torch.as_tensor(lengths).float()
        mu = (w * r).sum() / w.sum()
        var = (w * (r - mu) ** 2).sum() / (w.sum() - 1).clamp(min=1)
        return torch.sigmoid((r - mu) / torch.sqrt(var + 1e-8))
    r = r.reshape(-1, group_size if norm == "group" else r.numel())
    var = r.var(dim=1, keepdim=True) if r.shape[1] > 1 else torch.zeros_like(r[:, :1])
    z = (r - r.mean(1, keepdim=True)) / torch.sqrt(var + 1e-8)
    return torch.sigmoid(z).reshape(rewards.shape)


def advantages(rewards, group_size, algo="empg", reward_norm="batch", baseline="half",
               lengths=None):  # fmt: skip
    """EMPG: A = 2(R̃ − b), b = ½ (the author's 2·sigmoid(z) − 1, in (−1, 1)) or b = mean R̃.
    GRPO: A = (R − mean_group) / (std_group + 1e-6)."""
    if algo == "grpo":
        r = rewards.float().reshape(-1, group_size)
        z = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-6)
        return z.reshape(rewards.shape)
    rt = sigmoid_normalize(rewards, reward_norm, group_size, lengths)
    return 2 * (rt - (0.5 if baseline == "half" else rt.mean()))


# ---- M-step: log-probs, the losses, one optimizer step
def completion_logprobs(model, input_ids, attention_mask, completion_mask, temperature=1.0,
                        chunk=1024, with_entropy=False):  # fmt: skip
    """(log πθ(y_t | x, y_<t) at temperature T, entropy or None) of each completion token: (B, T)
    fp32, 0 off the completion. input_ids = [left-padded prompt | right-padded completion]; EOS is
    a completion token. Only completion positions reach the vocab projection (vocab_logprobs)."""
    pos = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    kw = dict(use_cache=False, logits_to_keep=1, output_hidden_states=True)  # no full logits
    h = model(input_ids, attention_mask, pos, **kw).hidden_states[-1]
    sel, T = completion_mask.bool(), completion_mask.shape[1]
    h, y = h[:, -T - 1 : -1][sel], input_ids[:, -T:][sel]  # state t predicts token t + 1
    w = model.get_output_embeddings().weight
    flat = vocab_logprobs(h, y, w, temperature, chunk, with_entropy)
    unflat = lambda k: torch.zeros(sel.shape, device=h.device).masked_scatter(sel, flat[:, k])
    return unflat(0), unflat(1) if with_entropy else None


def seq_mean(x, mask):
    """Mean over each sequence's completion tokens → (B,)."""
    return (x * mask).sum(-1) / mask.sum(-1).clamp(min=1)


# Loss aggregation: a token mean per sequence, then a mean over sequences. Eq. 12's E_τ weighs
# every trajectory equally, so one long rambling completion cannot outweigh short correct ones
# (the author's code aggregates the same way).
def empg_loss(logp, mask, adv):
    """L = −mean_τ [A(τ) · mean_t log πθ(y_t)] (Eq. 12): REINFORCE on smoothed rewards."""
    return -seq_mean(adv[:, None] * logp, mask).mean()


def grpo_loss(logp, old_logp, mask, adv, clip_eps=0.2):
    """PPO-clip surrogate, ratio ρ = πθ/πθ*: −mean_τ mean_t min(ρA, clip(ρ, 1 ± ε)A)."""
    ratio, a = torch.exp(logp - old_logp), adv[:, None]
    surr = torch.minimum(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)
    return -seq_mean(surr, mask).mean()


def kl_k3(logp, ref_logp):
    """Per-token k3 estimate of KL(πθ‖π_ref), e^r − r − 1 with r = ref − logp, clamped as in the
    author's code (r to ±20, the estimate to ±10): one wild token cannot blow up the loss."""
    r = (ref_logp - logp).clamp(-20, 20)
    return (torch.exp(r) - r - 1).clamp(-10, 10)


def micro_batch_loss(logp, old_logp, ref_logp, entropy, mask, adv, args):
    """One micro-batch's objective, Eq. 12 (or GRPO's) + β·KL(πθ‖π_init) − c·entropy; its parts."""
    zero = logp.new_zeros(())
    if args.algo == "grpo":
        loss = grpo_loss(logp, old_logp, mask, adv, args.clip_eps)
        clipped = ((logp.detach() - old_logp).exp() - 1).abs() > args.clip_eps
        clip = seq_mean(clipped.float(), mask).mean()
    else:
        loss, clip = empg_loss(logp, mask, adv), zero
    kl = seq_mean(kl_k3(logp, ref_logp), mask).mean() if ref_logp is not None else zero
    ent = seq_mean(entropy, mask).mean() if entropy is not None else zero
    loss = loss + args.beta * kl - args.entropy_coef * ent
    return loss, dict(loss=loss.detach(), kl=kl.detach(), entropy=ent.detach(), clip_frac=clip)


def m_step(policy, opt, prompts, comps, adv, args, ref=None, autocast=contextlib.nullcontext,
           pad_id=0):  # fmt: skip
    """M-step (Eq. 12): `updates_per_batch` optimizer steps on one E-step's samples. A micro-batch's
    loss is a mean over its sequences, weighted by its share of the batch: the sum is the batch
    mean, and the step does not depend on how the batch was cut (tested)."""
    dev, T, chunk, S = policy.device, args.temperature, args.logprob_chunk, len(comps)
    adv, with_entropy = adv.to(dev), args.entropy_coef > 0
    mbs = micro_batches(prompts, comps, args.micro_batch_size, args.micro_batch_tokens)
    old = {}  # θ*'s log-probs for GRPO's ratio: the first pass runs at θ = θ*, so they are free
    policy.train()
    for _ in range(args.updates_per_batch):
        tot = dict(loss=0, kl=0, entropy=0, clip_frac=0)  # summed on the device: one sync a step
        for j, mb in enumerate(mbs):
            mb_prompts, mb_comps = [prompts[i] for i in mb], [comps[i] for i in mb]
            ids, attn, cmask = collate(mb_prompts, mb_comps, pad_id, dev)
            with autocast():
                logp, ent = completion_logprobs(policy, ids, attn, cmask, T, chunk, with_entropy)
            ref_logp = None
            if ref is not None:
                with torch.no_grad(), autocast():
                    ref_logp, _ = completion_logprobs(ref, ids, attn, cmask, T, chunk)
            old.setdefault(j, logp.detach())
            loss, parts = micro_batch_loss(logp, old[j], ref_logp, ent, cmask, adv[mb], args)
            (loss * len(mb) / S).backward()
            tot = {k: tot[k] + v * len(mb) / S for k, v in parts.items()}
        tot = {k: float(v) for k, v in tot.items()}
        grad_norm, skipped = optimizer_step(policy, opt, args.grad_clip, math.isfinite(tot["loss"]))
    return dict(tot, grad_norm=grad_norm, skipped=int(skipped))


# ---- The loop: Algorithm 1
def train(args):
    run = build(args)  # θ, θ*, θ*'s decoder, the optimizer, the data, the run dir (Part II)
    a, N, eos, pad = args, args.num_samples, run.eos_ids, run.pad_id
    for step in progress(run):  # step = optimizer steps taken so far
        # ---- θ* ← θ: freeze the weights that sample this step (and take the test score)
        sync_theta_star(run.theta_star, run.policy)
        if a.eval_every and step % a.eval_every == 0:
            evaluate(run, step)
        # ---- E-step: N completions per prompt from θ* (this process's slice of the prompts)
        run.phase("sampling")
        t0 = time.time()
        rows = [run.rows[i] for i in step_prompts(step, len(run.rows), a.prompts_per_step, a.seed)]
        rows = rows[run.mine]
        gen = sampling_generator(run, step)  # a function of (seed, step): an exact resume
        prompts = [r["ids"] for r in rows]
        comps = sample(run.theta_star, prompts, N, a.max_new_tokens, eos, pad, a.temperature, gen,
                       run.decoder)  # fmt: skip
        # ---- reward R(τ) ∈ {0,1} → R̃ → A; statistics over the whole batch (all processes)
        run.phase("grading")
        texts = run.tok.batch_decode(comps, skip_special_tokens=True)
        local = [REWARDS[run.task](c, rows[i // N]["answer"]) for i, c in enumerate(texts)]
        rewards = torch.tensor(gather_all(local))
        lens = torch.tensor(gather_all([len(c) for c in comps]))
        adv = advantages(rewards, N, a.algo, a.reward_norm, a.baseline, lens)
        # ---- M-step (Eq. 12): one optimizer step up Σ A(τ) ∇ log Pθ(τ), then discard the samples
        run.phase("training")
        t1 = time.time()
        run.decoder.make_room()  # the KV cache goes if the M-step needs its memory
        repeated, mine = [p for p in prompts for _ in range(N)], adv[run.mine_samples]
        stats = m_step(run.policy, run.opt, repeated, comps, mine, a, run.ref, run.autocast, pad)
        # ---- log and save
        times = dict(estep_s=t1 - t0, mstep_s=time.time() - t1)
        log_step(run, step + 1, stats, rewards, lens, adv, comps, texts, rows, times)
        if (step + 1) % a.save_every == 0 or step + 1 == a.steps or run.stop:
            save_checkpoint(run, step + 1)
    return finish(run)


# ==================================================================================================
# PART II — SPEED, MEMORY, SCALE, I/O: skip on first read (measured figures: the README's speed part)
# ==================================================================================================


# ---- The command line: flags from Args, presets resolved, every number checked up front
AT_LEAST = dict(steps=1, prompts_per_step=1, num_samples=1, max_new_tokens=1, updates_per_batch=1,
                micro_batch_size=1, logprob_chunk=1, save_every=1, max_prompt_chars=0, beta=0,
                entropy_coef=0, micro_batch_tokens=0, eval_every=0, eval_limit=0, log_samples=0,
                seed=0)  # fmt: skip
RESUMABLE = (
    "steps save_every log_samples eval_every eval_limit eval_dataset resume overwrite".split()
)


def parse_args(argv=None):
    note = "--resume keeps the run's flags, but for " + ", ".join(map(flag, RESUMABLE))
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(description=__doc__, epilog=note, formatter_class=fmt)
    p.error = lambda msg: die(msg)  # one line, not argparse's usage block
    for f in fields(Args):
        kw = dict(type=f.metadata["kind"], default=f.default, choices=f.metadata["choices"] or None)
        kw = dict(action="store_true") if f.type is bool else kw
        p.add_argument(flag(f.name), help=f"{f.metadata['help']} (default: {f.default})", **kw)
    a = Args(**vars(p.parse_args(argv)))
    for k, v in PRESETS.get(a.dataset, OURS).items():
        setattr(a, k, v if getattr(a, k) is None else getattr(a, k))
    for k, v in asdict(a).items():
        if isinstance(v, float) and not math.isfinite(v):
            die(f"{flag(k)} must be a finite number")
    for k, least in AT_LEAST.items():
        if getattr(a, k) is not None and getattr(a, k) < least:
            die(f"{flag(k)} must be >= {least}")
    checks = [
        (0 < a.temperature <= 10, "--temperature must be in (0, 10]"),
        (0 <= a.lr < 1, "--lr must be in [0, 1)"),
        (0 <= a.weight_decay < 1, "--weight-decay must be in [0, 1)"),
        (a.grad_clip > 0, "--grad-clip must be > 0"),
        (0 < a.clip_eps < 1, "--clip-eps must be in (0, 1)"),
        (a.seed < 2**31, "--seed must be below 2^31"),
        (re.fullmatch(r"auto|cpu|cuda(:\d+)?", a.device), "--device must be auto, cpu, cuda[:N]"),
        ("{question}" in (a.prompt_template or "{question}"), "--prompt-template: no {question}"),
        (a.num_samples > 1 or a.reward_norm != "group", "--reward-norm group: --num-samples >= 2"),
        (a.num_samples > 1 or a.algo != "grpo", "--algo grpo: --num-samples >= 2"),
        (a.master_dtype == "fp32" or a.dtype != "fp32", "--master-dtype bf16 computes in bf16"),
        (not (a.resume and a.overwrite), "--resume and --overwrite contradict each other"),
    ]
    for ok, msg in checks:
        if not ok:
            die(msg)
    return a


def flag(name):
    return "--" + name.replace("_", "-")


PROG = "empg"  # eval.py sets "eval": errors name the program the user ran


def say(msg):
    print(msg, file=sys.stderr)


def die(msg):
    """One clear line on stderr (from the first process only), no traceback, exit 2."""
    if os.environ.get("RANK", "0") == "0":
        print(f"{PROG}: error: {msg}", file=sys.stderr)
    else:
        time.sleep(3)  # torchrun stops every process once one exits: let the first one print
    sys.exit(2)


def optimizer_step(policy, opt, grad_clip, loss_finite=True):
    """Clip the global grad norm and step. A non-finite loss or gradient skips the step (logged;
    three in a row stop the run) instead of poisoning θ."""
    norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), grad_clip)
    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP2: a DTensor
    skipped = not (loss_finite and math.isfinite(norm))
    if not skipped:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return norm, skipped


# ---- The fast E-step: our decode step on a KV cache allocated once, eager or as CUDA graphs
BLOCK = 256  # the KV cache is allocated and read BLOCK columns at a time: few shapes, few graphs


def make_decoder(model, flag="auto", master_dtype="fp32"):
    """The one place --sampler is resolved. auto: compiled on CUDA; static on CPU, and with bf16
    master weights (whose KV cache is usually freed before each M-step, while a CUDA graph wants it
    to stay put); hf where our decode step does not know the architecture."""
    c = model.config
    ours = c.model_type in ("qwen2", "llama") and not getattr(c, "use_sliding_window", False)
    if flag == "auto":
        flag = "static" if model.device.type != "cuda" or master_dtype == "bf16" else "compiled"
        flag = flag if ours else "hf"
    if flag != "hf" and not ours:
        die(f"--sampler {flag} knows qwen2/llama without a sliding window, not {c.model_type}")
    if flag == "hf":
        return PlainDecoder(model)
    return StaticDecoder(model, compiled=flag == "compiled")


def left_pad(seqs, pad_id, device):
    """(B, longest) ids with every sequence flush right, and the mask of real tokens."""
    ids = torch.full((len(seqs), max(map(len, seqs))), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, ids.shape[1] - len(s) :] = torch.tensor(s)
    lengths = torch.tensor([len(s) for s in seqs])[:, None]
    mask = torch.arange(ids.shape[1]) >= ids.shape[1] - lengths
    return ids.to(device), mask.long().to(device)


def rope(x, cos, sin):
    """Rotary position embedding in HF's rotate-half layout."""
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat((-x2, x1), -1) * sin


def decode_step(model, kv, valid, tok, pos, col, width, attention="sdpa"):
    """Next-token logits (R, vocab) for tokens tok (R,) at positions pos (R, 1), their K/V written
    to cache column col (a 1-element tensor: the column moves, the graph does not). valid (R, L)
    marks the columns each row may attend to; attention reads the first `width` only (the filled
    part, in BLOCKs: the cache, not the weights, dominates the bytes a long decode reads)."""
    m, R = model.model, tok.shape[0]
    x = m.embed_tokens(tok[:, None])  # (R, 1, D)
    cos, sin = m.rotary_emb(x, pos)  # each row at its own position
    valid.index_fill_(1, col, True)
    for layer, (K, V) in zip(m.layers, kv):  # K, V: (R, KV heads, L, d)
        a, h = layer.self_attn, layer.input_layernorm(x)
        q = rope(a.q_proj(h).view(R, -1, a.head_dim), cos, sin)  # (R, H, d)
        K.index_copy_(2, col, rope(a.k_proj(h).view(R, -1, a.head_dim), cos, sin)[:, :, None])
        V.index_copy_(2, col, a.v_proj(h).view(R, -1, 1, a.head_dim))
        q = q.view(R, K.shape[1], -1, a.head_dim)  # (R, KV heads, H/KV, d)
        o = decode_attention(
            q, K[:, :, :width], V[:, :, :width], valid[:, :width], a.scaling, attention
        )
        x = x + a.o_proj(o.reshape(R, 1, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.get_output_embeddings()(m.norm(x))[:, 0]


def decode_attention(q, K, V, valid, scale, attention="sdpa"):
    """One new token per row against its cache, grouped-query heads folded onto their KV head: the
    H/KV query heads of a KV head attend as H/KV query rows of it, so each cache entry is read once,
    not H/KV times (6× for Qwen2.5-1.5B). 'sdpa': torch's kernel (a boolean mask rules out flash);
    'matmul': two batched matmuls around an fp32 softmax. Which is faster is for the GPU to say."""
    if attention == "sdpa":
        return F.scaled_dot_product_attention(q, K, V, attn_mask=valid[:, None, None], scale=scale)
    s = torch.matmul(q, K.transpose(-1, -2)).float() * scale  # (R, KV, H/KV, width)
    p = s.masked_fill(~valid[:, None, None], float("-inf")).softmax(-1)
    return torch.matmul(p.to(V.dtype), V)


class StaticDecoder:
    """decode_step on K/V buffers allocated once and kept between E-steps (and eval batches of the
    same row count). Every tensor keeps its shape and address, so compiled=True captures the step
    with torch.compile (mode reduce-overhead: CUDA graphs), one graph per BLOCK-wide window and
    cache allocation — a known bound the recompile limit is raised to. A failed compile, or a limit
    hit, warns once and the step runs eagerly."""

    def __init__(self, model, compiled=False, attention="sdpa"):
        self.model, self.compiled, self.kv, self.valid = model, compiled, None, None
        self.attention = attention  # decode_attention's kernel
        self.fn, self.graph_bound = decode_step, 0
        if compiled:  # dynamic=False: one graph per shape, a bound we can count
            kw = dict(mode="reduce-overhead", fullgraph=True, dynamic=False)
            self.fn = torch.compile(decode_step, **kw)
        # what the last M-step needed beyond what it started with (CUDA; first: assume the worst)
        self.mstep_bytes, self.mstep_start = math.inf, None

    def allocate(self, rows, length, like):
        if self.valid is not None and self.valid.shape[0] == rows and self.valid.shape[1] >= length:
            return
        self.kv = self.valid = None  # never hold the old cache and the new one at once
        L, kv_heads, d = -(-length // BLOCK) * BLOCK, like.shape[1], like.shape[-1]
        new = lambda: like.new_zeros(rows, kv_heads, L, d)
        self.kv = [(new(), new()) for _ in self.model.model.layers]
        self.valid = torch.zeros(rows, L, dtype=torch.bool, device=like.device)
        for t in (self.valid, *(x for pair in self.kv for x in pair)):
            torch._dynamo.mark_static_address(t)  # CUDA graphs keep pointers to these
        if self.compiled:  # a new allocation: one new graph per window width it reads
            self.graph_bound += L // BLOCK
            cfg = torch._dynamo.config
            cfg.recompile_limit = max(cfg.recompile_limit, self.graph_bound)
            # past the bound: our warning below, never a silent eager run
            cfg.fail_on_recompile_limit_hit = True

    def prefill(self, ids, mask, n, max_new_tokens):
        from transformers import DynamicCache

        cache, (B, P) = DynamicCache(config=self.model.config), ids.shape
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = self.model(ids, mask, pos, cache, logits_to_keep=1).logits[:, -1]
        self.allocate(B * n, P + max_new_tokens, cache.layers[0].keys)
        for (K, V), layer in zip(self.kv, cache.layers):  # prefilled once, copied to n rows
            K[:, :, :P] = layer.keys.repeat_interleave(n, 0)
            V[:, :, :P] = layer.values.repeat_interleave(n, 0)
        self.valid.zero_()[:, :P] = mask.bool().repeat_interleave(n, 0)
        self.pos = pos[:, -1:].repeat_interleave(n, 0)
        self.col, self.filled = torch.full((1,), P - 1, device=ids.device), P - 1  # tensor, int
        return logits.repeat_interleave(n, 0)

    def decode(self, tok):
        self.pos += 1
        self.col += 1
        self.filled += 1
        width = min(self.valid.shape[1], (self.filled // BLOCK + 1) * BLOCK)
        args = (self.model, self.kv, self.valid, tok, self.pos, self.col, width, self.attention)
        if self.compiled:
            torch.compiler.cudagraph_mark_step_begin()  # the last logits are consumed: reuse buffers
        try:
            return self.fn(*args)
        except Exception as e:  # no Triton, an unsupported op, the bound hit: carry on eagerly
            if not self.compiled:
                raise
            why = type(e).__name__
            print(f"empg: warning: torch.compile failed ({why}); decoding eagerly", file=sys.stderr)
            self.compiled, self.fn = False, decode_step
            return decode_step(*args)  # writing the same cache column again is harmless

    def make_room(self):
        """Before the M-step: free the KV cache if the free device memory is less than what the last
        M-step needed (measured; the first M-step assumes the worst). Kept, the next E-step reuses
        it and its graphs."""
        if self.valid is not None and self.valid.device.type == "cuda":
            dev = self.valid.device  # free = the device's, plus what torch holds cached but unused
            free = torch.cuda.mem_get_info(dev)[0] + torch.cuda.memory_reserved(dev)
            if free - torch.cuda.memory_allocated(dev) < self.mstep_bytes:
                self.kv = self.valid = None
                torch.cuda.empty_cache()
                # graphs point into the cache, and a new cache every step would recompile them;
                # the first M-step, not yet measured, frees it without that verdict
                if self.compiled and math.isfinite(self.mstep_bytes):
                    say("empg: warning: memory is short: the KV cache goes before each M-step and the "
                        "decoder runs eagerly")  # fmt: skip
                    self.compiled, self.fn = False, decode_step
            self.mstep_start = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()

    def measure_mstep(self):
        if self.mstep_start is not None:
            self.mstep_bytes = 1.1 * (torch.cuda.max_memory_allocated() - self.mstep_start)


# ---- The fast M-step: chunked vocab projection, micro-batches
def _chunk_logprobs(h, y, weight, temperature, with_entropy):
    logits = F.linear(h, weight).float() / temperature  # re-scored at the sampling temperature
    lse = logits.logsumexp(-1)
    logp = logits.gather(-1, y[:, None]).squeeze(-1) - lse
    if not with_entropy:
        return logp[:, None]
    return torch.stack([logp, lse - (logits.softmax(-1) * logits).sum(-1)], -1)


def vocab_logprobs(h, y, weight, temperature, chunk, with_entropy):
    """(N, 1 or 2): log p(y) [and the entropy] from final hidden states h (N, D), the vocab
    projection and its logsumexp `chunk` tokens at a time and recomputed in backward: never the (N ×
    vocab) fp32 logits at once."""
    scored = lambda i: checkpoint(
        _chunk_logprobs, h[i : i + chunk], y[i : i + chunk], weight, temperature, with_entropy,
        use_reentrant=False)  # fmt: skip
    parts = [scored(i) for i in range(0, len(y), chunk)]
    return torch.cat(parts) if parts else h.new_zeros(0, 1 + with_entropy, dtype=torch.float32)


def collate(prompts, completions, pad_id, device):
    """[left-padded prompt | right-padded completion] ids, attention mask and completion mask."""
    P, T = max(map(len, prompts)), max(max(map(len, completions)), 1)
    ids = torch.full((len(prompts), P + T), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, P - len(p) : P + len(c)] = torch.tensor(p + c)
        attn[i, P - len(p) : P + len(c)] = 1
    return ids.to(device), attn.to(device), attn[:, P:].float().to(device)


def micro_batches(prompts, comps, size, tokens=0):
    """Indices of the sequences, longest first, cut into micro-batches of `size`, or with tokens > 0
    each as large as fits count × padded length ≤ tokens (prompts left-, completions right-padded).
    Under torchrun every process gets as many micro-batches (same_count_on_all_ranks)."""
    order = sorted(range(len(comps)), key=lambda i: len(prompts[i]) + len(comps[i]), reverse=True)
    mbs = [[]]
    for i in order:
        grown = mbs[-1] + [i]
        longest = max(len(prompts[j]) for j in grown) + max(len(comps[j]) for j in grown)
        if len(grown) == 1 or (len(grown) * longest <= tokens if tokens else len(grown) <= size):
            mbs[-1] = grown
        else:
            mbs.append([i])
    return same_count_on_all_ranks(mbs)


def same_count_on_all_ranks(mbs):
    """FSDP2's collectives pair up across processes once per forward and backward, so every process
    runs as many micro-batches as the busiest: the others split their largest until the counts agree
    (all hold as many sequences, so they always can)."""
    target = max(gather_all([len(mbs)]))
    while len(mbs) < target:
        i = max(range(len(mbs)), key=lambda j: len(mbs[j]))
        mbs[i : i + 1] = [mbs[i][: len(mbs[i]) // 2], mbs[i][len(mbs[i]) // 2 :]]
    return mbs


# ---- bf16 master weights: AdamW with stochastic rounding
def stochastic_round(x, generator=None):
    """fp32 → bf16, rounding up with probability equal to the remainder, so E[result] = x. bf16 is
    the top half of an fp32's bits: add uniform noise to the 16 bits that get cut, then cut them."""
    kw = dict(dtype=torch.int32, device=x.device, generator=generator)
    noise = torch.randint(0, 1 << 16, x.shape, **kw)
    return ((x.view(torch.int32) + noise) & -65536).view(torch.float32).to(torch.bfloat16)


class AdamWSR(torch.optim.Optimizer):
    """AdamW for bf16 master weights (--master-dtype bf16): weights, grads and both moments in bf16,
    8 bytes a parameter instead of 16. Each update is computed in fp32 and stochastically rounded
    back: round-to-nearest would erase every step under half a bf16 spacing (at lr 1e-6, all of
    them); stochastic rounding keeps them on average. On fp32 weights this is plain AdamW."""

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, seed=0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.seed = seed

    @torch.no_grad()
    def step(self, closure=None):
        gen, chunk = None, 1 << 24  # fp32 temporaries for 16M values at a time
        for group in self.param_groups:
            (b1, b2), lr, eps, wd = group["betas"], group["lr"], group["eps"], group["weight_decay"]
            for p in (p for p in group["params"] if p.grad is not None):
                st = self.state[p]
                if not st:
                    zeros = torch.zeros_like
                    st.update(step=torch.tensor(0.0), exp_avg=zeros(p), exp_avg_sq=zeros(p))
                t = int(st["step"].add_(1))
                if gen is None:  # noise from (seed, step): a resumed run rounds the same
                    gen = torch.Generator(p.device).manual_seed(self.seed * 1_000_003 + t)
                keep = lambda x: x
                rnd = (lambda x: stochastic_round(x, gen)) if p.dtype == torch.bfloat16 else keep
                tensors = (p, p.grad, st["exp_avg"], st["exp_avg_sq"])
                parts = (x.view(-1).split(chunk) for x in tensors)
                for w, g, m, v in zip(*parts):
                    g, m32, v32 = g.float(), m.float(), v.float()
                    m32.lerp_(g, 1 - b1)
                    v32.mul_(b2).addcmul_(g, g, value=1 - b2)
                    # the moments are rounded stochastically too: v's 0.1 % steps (1 − β2) are
                    # below half a bf16 spacing (0.4 %) and would stall it
                    m.copy_(rnd(m32))
                    v.copy_(rnd(v32))
                    upd = (m32 / (1 - b1**t)) / ((v32 / (1 - b2**t)).sqrt_() + eps)
                    w.copy_(rnd(w.float().mul_(1 - lr * wd).sub_(lr * upd)))


def make_optimizer(policy, args, dev):
    if args.master_dtype == "bf16":
        return AdamWSR(
            policy.parameters(), lr=args.lr, weight_decay=args.weight_decay, seed=args.seed
        )
    fused = {"fused": True} if dev.type == "cuda" else {}  # one kernel for all parameters
    return torch.optim.AdamW(
        policy.parameters(), lr=args.lr, weight_decay=args.weight_decay, **fused
    )


# ---- Models, devices, θ*
def device_and_dtype(args):
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(auto if args.device == "auto" else args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        die(f"--device {args.device} but no CUDA GPU is visible")
    bf16_master = getattr(args, "master_dtype", "fp32") == "bf16"  # (eval.py has no such flag)
    bf16 = args.dtype == "bf16" or (args.dtype == "auto" and (dev.type == "cuda" or bf16_master))
    if bf16 and dev.type == "cpu" and not torch.cpu._is_avx512_bf16_supported() and not bf16_master:
        die("--dtype bf16 on a CPU without native bf16 (AVX512-BF16); use --dtype fp32")
    return dev, torch.bfloat16 if bf16 else torch.float32


@functools.cache
def hub_offline():
    """Whether to use the local Hugging Face cache only: yes when the hub does not answer within 3 s,
    which then fails (or loads from the cache) at once instead of after ~25 s of retries a file."""
    import huggingface_hub.constants as hub
    from urllib.parse import urlparse

    if hub.HF_HUB_OFFLINE:
        return True
    try:
        socket.create_connection((urlparse(hub.ENDPOINT).hostname, 443), timeout=3).close()
        return False
    except OSError:
        hub.HF_HUB_OFFLINE = True
        say(f"{PROG}: warning: the Hugging Face hub is unreachable; using the local cache only")
        return True


def load_model(name, device, dtype=torch.float32, insist_cpu=False):
    """A hub name or a local dir; a dir with a config and no weights gives random weights (tests)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if (os.path.isabs(name) or name.startswith(".")) and not os.path.isdir(name):
        die(f"cannot load model {name!r}: no such directory")
    offline = not os.path.isdir(name) and hub_offline()
    try:
        cfg = AutoConfig.from_pretrained(name)
        with torch.device("meta"):
            n = sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters())
        if device.type == "cpu" and n >= 1e9 and not insist_cpu:
            die(
                f"no CUDA GPU: a {n / 1e9:.1f}B model on a CPU would take days; pass --device cpu to insist"
            )
        weights = os.path.isdir(name) and any(
            f.endswith((".safetensors", ".bin")) for f in os.listdir(name)
        )
        if os.path.isdir(name) and not weights:
            torch.manual_seed(0)
            return AutoModelForCausalLM.from_config(cfg, dtype=dtype).to(device)
        return AutoModelForCausalLM.from_pretrained(name, dtype=dtype).to(device)
    except (OSError, ValueError, RuntimeError, KeyError, ImportError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        hint = "; the hub is unreachable: pass a local dir" if offline else ""
        die(f"cannot load model {name!r}: {why}{hint}")


def load_tokenizer(name):
    from transformers import AutoTokenizer

    if (os.path.isabs(name) or name.startswith(".")) and not os.path.isdir(name):
        die(f"cannot load tokenizer {name!r}: no such directory")
    offline = not os.path.isdir(name) and hub_offline()
    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        die(
            f"cannot load tokenizer {name!r}: {why}"
            + ("; the hub is unreachable" if offline else "")
        )


def stop_ids(tok, model, template):
    """Every id that ends a completion: the tokenizer's and model's EOS, and <|im_end|> for chat
    markup."""
    ids = {tok.eos_token_id}
    for src in (model.config, getattr(model, "generation_config", None)):
        e = getattr(src, "eos_token_id", None)
        ids |= set(e if isinstance(e, list) else [e])
    if "<|im_end|>" in template and "<|im_end|>" in tok.get_vocab():
        ids.add(tok.convert_tokens_to_ids("<|im_end|>"))
    return {i for i in ids if i is not None}


def frozen_copy(policy, dtype):
    """A frozen copy of the policy in the compute dtype, built in that dtype and filled parameter by
    parameter: no full-size fp32 transient (a deepcopy before .to(bf16) costs 6 GB for 1.5B)."""
    import copy

    from transformers import AutoModelForCausalLM

    with torch.device(policy.device):
        twin = AutoModelForCausalLM.from_config(copy.deepcopy(policy.config), dtype=dtype)
    twin.load_state_dict(policy.state_dict())  # into twin's bf16 storage, one tensor at a time
    return twin.eval().requires_grad_(False)


@torch.no_grad()
def sync_theta_star(theta_star, policy):
    """θ* ← θ, parameter by parameter (FSDP2: each shard all-gathered in turn); when θ* is θ itself,
    only eval mode (no dropout; gradient checkpointing would switch the decoder's KV cache off)."""
    theta_star.eval()
    if theta_star is not policy:
        for ps, p in zip(theta_star.parameters(), policy.parameters()):
            ps.copy_(p.full_tensor() if hasattr(p, "full_tensor") else p)


# ---- Many GPUs: `torchrun --nproc-per-node G empg.py ...` runs G copies of this file. Each samples its
# share of the step's prompts with a full θ*; the M-step shards parameters, grads and AdamW state
# (FSDP2).
def init_distributed(args):
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1
    world = int(os.environ["WORLD_SIZE"])
    if args.prompts_per_step % world:
        die(f"--prompts-per-step {args.prompts_per_step} is not divisible by the {world} processes")
    if args.master_dtype == "bf16":
        die(
            "--master-dtype bf16 is for one process; under torchrun FSDP2 shards fp32 master weights"
        )
    cuda = torch.cuda.is_available() and args.device != "cpu"
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), world


def gather_all(xs):
    """Concatenate a per-process list over all processes, in rank order (= the one-process order)."""
    if not dist.is_initialized():
        return xs
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, xs)
    return [x for o in out for x in o]


def shard(model, dtype):
    """FSDP2: each decoder layer and the root become a shard group; bf16 compute, fp32 master and
    grad reduction."""
    import warnings

    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for layer in model.base_model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)


# ---- Data: the hub or local files, the author's prompt filter, tokenized once
def read_jsonl(path):
    """[(line number, row)] of a JSONL file; one clear line and exit 2 for anything unreadable."""
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        die(f"cannot read {path}: {getattr(e, 'strerror', None) or e}")
    rows = []
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line) if line.strip() else None
        except json.JSONDecodeError as e:
            die(f"{path}:{n} is not valid JSON ({e.msg})")
        if row is not None and not isinstance(row, dict):
            die(f"{path}:{n} is not a JSON object")
        rows += [(n, row)] if row is not None else []
    if not rows:
        die(f"{path} has no rows")
    return rows


def _problem(row, where):
    q = next((row[k] for k in ("question", "problem", "prompt") if k in row), None)
    a = row.get("answer")
    if not isinstance(q, str) or not q.strip():
        die(f"{where}: needs a non-empty 'question' (or 'problem'/'prompt') string")
    if isinstance(a, float) and math.isfinite(a) and a == int(a):
        a = int(a)
    if (
        isinstance(a, bool)
        or not isinstance(a, (str, int))
        or (isinstance(a, str) and not a.strip())
    ):
        die(f"{where}: 'answer' must be a non-empty string or a number, not {json.dumps(a)[:40]}")
    return {"question": q, "answer": final_answer(str(a))}


def _hub(*a, **kw):
    offline = hub_offline()
    try:
        import datasets

        datasets.config.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE or offline
        return list(datasets.load_dataset(*a, **kw))
    except Exception as e:
        why = "the hub is unreachable" if offline else type(e).__name__
        die(f"cannot load {a[0]} from the Hugging Face hub ({why}); use --data-dir DIR")


def load_problems(dataset, split="train", data_dir=""):
    """Rows {question, answer (the reference final answer)} and the task ('gsm8k' or 'math') that
    grades them. dataset: gsm8k | math-hard (train: MATH levels 3-5 minus MATH-500; test:
    MATH-500) | math500 | math-hard-l5 | x.jsonl. data_dir: local files, else the hub."""
    if dataset.endswith(".jsonl"):
        return [_problem(r, f"{dataset}:{n}") for n, r in read_jsonl(dataset)], "math"
    if dataset == "gsm8k":
        hub = lambda: _hub("openai/gsm8k", "main", split=split)
        rows = _local(data_dir, "gsm8k", f"{split}.jsonl") if data_dir else hub()
        return [_problem(r, f"gsm8k {split} row {n}") for n, r in enumerate(rows, 1)], "gsm8k"
    if dataset not in ("math-hard", "math500", "math-hard-l5"):
        die(f"unknown dataset {dataset!r}: use gsm8k, math-hard, math500, math-hard-l5 or a .jsonl")
    rows = _math_rows(dataset, split, data_dir)
    answer = lambda r: r.get("answer") or last_boxed(r["solution"]) or ""
    return [{"question": r["problem"], "answer": answer(r)} for r in rows], "math"


def _local(data_dir, *path):
    return [r for _, r in read_jsonl(os.path.join(data_dir, *path))]


def _math_rows(dataset, split, data_dir):
    lighteval = lambda s: _hub("DigitalLearningGmbH/MATH-lighteval", split=s)
    m500 = lambda: _local(data_dir, "math", "math500_test.jsonl") if data_dir else _hub(
        "HuggingFaceH4/MATH-500", split="test")  # fmt: skip
    if dataset == "math-hard" and split == "train":  # the author's "MATH HARD" train set, rebuilt
        if data_dir:
            rows = _local(data_dir, "math", "train.jsonl") + _local(data_dir, "math", "test.jsonl")
        else:
            rows = [
                dict(r, level=r["level"].split()[-1])
                for s in ("train", "test")
                for r in lighteval(s)
            ]
        test = {r["problem"] for r in m500()}
        hard = lambda r: str(r["level"]).isdigit() and int(r["level"]) >= 3
        return [r for r in rows if hard(r) and r["problem"] not in test]
    if dataset == "math-hard-l5":
        if data_dir:
            return _local(data_dir, "math", "hard_test.jsonl")
        return [r for r in lighteval("test") if r["level"] == "Level 5"]
    return m500()  # math500, and math-hard's test set


def keep_short(rows, template, max_chars):
    """The author's prompt filter, on train and test alike: the templated prompt has at most
    max_chars characters (0: keep all). GSM8K: 7473 → 7230 train (225 steps of 32), 1319 → 1265
    test; MATH-500: 500 → 496."""
    rows = [dict(r, prompt=template.replace("{question}", r["question"])) for r in rows]
    return [r for r in rows if not max_chars or len(r["prompt"]) <= max_chars]


def prepare(rows, tok, template, max_chars, model, max_new_tokens, what):
    """keep_short(), then each prompt tokenized once; a prompt the model cannot hold, or ids beyond
    its vocabulary, stop the run with one line."""
    rows = keep_short(rows, template, max_chars)
    if not rows:
        die(f"no {what} prompt is within --max-prompt-chars {max_chars}")
    ids = tok([r["prompt"] for r in rows], add_special_tokens=False)["input_ids"]
    longest, top = max(map(len, ids)), max(max(x, default=0) for x in ids)
    context = getattr(model.config, "max_position_embeddings", None) or math.inf
    if longest + max_new_tokens > context:
        die(f"a {what} prompt of {longest} tokens + --max-new-tokens {max_new_tokens} exceeds the "
            f"model's context ({context}): lower --max-prompt-chars or --max-new-tokens")  # fmt: skip
    if top >= model.config.vocab_size:
        die(f"the tokenizer gives id {top}, beyond the model's vocabulary "
            f"({model.config.vocab_size}): wrong --tokenizer?")  # fmt: skip
    return [dict(r, ids=i) for r, i in zip(rows, ids)]


def step_prompts(step, n_rows, k, seed):
    """Row indices for a step: consecutive slices of a fresh permutation per epoch — a pure function
    of (seed, step), so a resumed run sees the same data order."""
    perms = {}  # one permutation per epoch touched

    def perm(e):
        if e not in perms:
            perms[e] = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed + e))
        return perms[e]

    return [perm(j // n_rows)[j % n_rows].item() for j in range(step * k, step * k + k)]


# ---- Graders' helpers, and the test score's grade (eval.py imports it)
def default_template(dataset, task):
    return (
        "{question}"
        if dataset.endswith(".jsonl")
        else GSM8K_TEMPLATE
        if task == "gsm8k"
        else MATH_TEMPLATE
    )


def extract_answer(completion):
    """The lenient cascade for free-form answers: last \\boxed{} → '####' however spaced → last
    number."""
    m = re.search(r"####\s*\$?\s*(-?[\d,]*\.?\d+)", completion)
    return last_boxed(completion) or (m and m.group(1).replace(",", "")) or last_number(completion)


def grade(completion, answer, task, verify=True):
    """One completion's test-score grade, for the in-run evaluation and eval.py alike: `correct` is
    the training reward's rule, `lenient` the free-form cascade (on GSM8K their gap is format
    learning); `extracted` is what `correct` read, so that maj@k votes by the same rule."""
    lenient = bool(math_reward(completion, answer, verify))
    if task == "gsm8k":
        return dict(
            extracted=hash_answer(completion),
            correct=bool(gsm8k_reward(completion, answer)),
            lenient=lenient,
        )
    return dict(extracted=extract_answer(completion), correct=lenient, lenient=lenient)


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
            return text[j + 1 : k]
    return None


def last_number(text):
    nums = re.findall(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+", text)
    return nums[-1].replace(",", "").rstrip(".") if nums else None


@functools.lru_cache(maxsize=65536)
def _parse(s):
    """math-verify's parse of one answer, cached: maj@k never parses the same string twice."""
    from math_verify import parse

    return parse(f"\\boxed{{{s}}}", parsing_timeout=5)


def answers_equal(pred, ref, verify=True):
    """math-verify equivalence (parse 5 s + verify 5 s at most); an error or time-out is 'not
    equal'. verify=False: equal strings only."""
    if pred.strip() == ref.strip() or not verify:
        return pred.strip() == ref.strip()
    try:
        from math_verify import verify

        gold, got = _parse(ref), _parse(pred)
        return bool(gold and got and verify(gold, got, timeout_seconds=5))
    except Exception:
        return False


# ---- The paper's test score, during the run
def load_eval_rows(args, tok, model):
    """The held-out set: --eval-dataset, else the training set's own test split (GSM8K test;
    MATH-500 for math-hard), through the same prompt filter. A .jsonl training set has none unless
    --eval-dataset names one."""
    name = args.eval_dataset or ("" if args.dataset.endswith(".jsonl") else args.dataset)
    if not args.eval_every or not name:
        return [], None
    rows, task = load_problems(name, "test", args.data_dir)
    template = args.prompt_template or default_template(name, task)
    rows = prepare(rows, tok, template, args.max_prompt_chars, model, args.max_new_tokens, "test")
    return rows[: args.eval_limit or None], task


@torch.no_grad()
def evaluate(run, step):
    """The paper's test score at `step`: θ* decodes the held-out set greedily, graded by grade()
    exactly as eval.py grades. Batches have the E-step's row count, so they reuse its KV cache and
    compiled graphs. → eval.jsonl"""
    if not run.eval_rows or any(e["step"] == step for e in run.evals):
        return
    t0, rows, b = time.time(), run.eval_rows[run.rank :: run.world], run.k * run.args.num_samples
    grades, lens = [], []
    for i in range(0, len(rows), b):
        run.phase(f"eval {i}/{len(rows)}")
        batch = rows[i : i + b]
        ids = [r["ids"] for r in batch] + [batch[-1]["ids"]] * (b - len(batch))  # the E-step's rows
        a = run.args
        comps = sample(
            run.theta_star, ids, 1, a.max_new_tokens, run.eos_ids, run.pad_id, 0, None, run.decoder
        )
        texts = run.tok.batch_decode(comps[: len(batch)], skip_special_tokens=True)
        grades += [grade(t, r["answer"], run.eval_task) for t, r in zip(texts, batch)]
        lens += [len(c) for c in comps[: len(batch)]]
    grades, lens = gather_all(grades), gather_all(lens)
    row = dict(step=step, test_score=sum(g["correct"] for g in grades) / len(grades))
    if run.eval_task == "gsm8k":
        row["lenient_score"] = sum(g["lenient"] for g in grades) / len(grades)
    row.update(mean_len=sum(lens) / len(lens), n=len(grades), seconds=time.time() - t0)
    run.evals.append(row)
    if run.rank == 0:
        append_jsonl(os.path.join(run.out_dir, "eval.jsonl"), [row])


def test_score(evals, k=10):
    """The paper's number: the mean of the last k evaluations (one every 5 steps, the step-0 one
    included)."""
    return sum(e["test_score"] for e in evals[-k:]) / len(evals[-k:]) if evals else None


# ---- The run: its dir, the objects it trains, its loop's progress, its logs
def build_models(args, dev, dtype, world=1, ckpt=None, state=None):
    """θ (trainable, master dtype), θ* (frozen, compute dtype; θ itself when they coincide on one
    process), θ*'s decoder, the KL reference, the optimizer and the autocast context. Shared by
    train() and --benchmark."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one progress bar: ours (no "Loading weights", "Writing...")
    master = torch.bfloat16 if args.master_dtype == "bf16" else torch.float32  # 1e-6 steps stay
    policy = load_model(ckpt or args.model, dev, master, insist_cpu=args.device == "cpu")
    if state is not None and "master" in state:  # fp32 weights; the checkpoint's files are bf16
        policy.load_state_dict(state["master"])
    gc = args.gradient_checkpointing
    if gc == "on" or (gc == "auto" and dev.type == "cuda"):
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy.config.use_cache = False
    theta_star = frozen_copy(policy, dtype) if dtype != master or world > 1 else policy
    ref = None
    if args.beta > 0:  # π_init: the weights the run started from
        if ckpt is None:
            ref = frozen_copy(policy, dtype)
        else:
            ref = load_model(args.model, dev, dtype, True).requires_grad_(False)
    if world > 1:
        shard(policy, dtype)
    opt = make_optimizer(policy, args, dev)
    if state is not None:
        full = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(policy, opt, state["optimizer"], options=full)
    autocast = contextlib.nullcontext
    if dtype != torch.float32:
        autocast = functools.partial(torch.autocast, dev.type, dtype=dtype)
    decoder = make_decoder(theta_star, args.sampler, args.master_dtype)
    objs = dict(policy=policy, theta_star=theta_star, decoder=decoder, ref=ref, opt=opt)
    return SimpleNamespace(**objs, autocast=autocast)


def build(args):
    """Everything a run needs, in the order a mistake should surface: the run dir, the data, the
    models, the checkpoint to resume from; then the logs are cut back to that checkpoint."""
    rank, world = init_distributed(args)
    dev, dtype = device_and_dtype(args)
    out_dir, lock = open_run_dir(args, rank)
    raw, task = load_problems(args.dataset, "train", args.data_dir)
    template = args.prompt_template or default_template(args.dataset, task)
    ckpt = latest_checkpoint(out_dir) if args.resume else None
    state = None
    if ckpt:
        state = torch.load(
            os.path.join(ckpt, "trainer_state.pt"), map_location="cpu", weights_only=False
        )
    run = build_models(args, dev, dtype, world, ckpt, state)
    tok = load_tokenizer(args.tokenizer or args.model)
    rows = prepare(
        raw, tok, template, args.max_prompt_chars, run.policy, args.max_new_tokens, "train"
    )
    args.steps = args.steps or max(1, len(rows) // args.prompts_per_step)  # one epoch, drop-last
    eval_rows, eval_task = load_eval_rows(args, tok, run.policy)
    k, N = args.prompts_per_step // world, args.num_samples
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    run.__dict__.update(
        args=args, rank=rank, world=world, dev=dev, out_dir=out_dir, lock=lock, tok=tok, task=task,
        rows=rows, eval_rows=eval_rows, eval_task=eval_task, k=k, pad_id=pad_id,
        mine=slice(rank * k, (rank + 1) * k), mine_samples=slice(rank * k * N, (rank + 1) * k * N),
        eos_ids=stop_ids(tok, run.theta_star, template), stop=False, skipped_in_a_row=0, bar=None,
    )  # fmt: skip
    run.phase = lambda what: run.bar and run.bar.set_description_str(f"{args.algo}: {what}")
    open_logs(run, state["step"] if state else 0)
    return run


def open_logs(run, start):
    """Cut the logs back to the checkpoint a run resumes from (a step-s evaluation comes after
    checkpoint s), keep them in memory for the summaries, and write args.json."""
    log = lambda name, keep: (
        read_log(os.path.join(run.out_dir, name), keep) if run.rank == 0 else []
    )
    run.start = run.saved = start
    run.metrics = log("metrics.jsonl", lambda r: r.get("step", 0) <= start)
    run.evals = log("eval.jsonl", lambda r: r.get("step", 0) < start)
    if run.rank == 0:
        log("samples.jsonl", lambda r: r.get("step", 0) <= start)
        write_atomic(os.path.join(run.out_dir, "args.json"), json.dumps(asdict(run.args), indent=1))


def sampling_generator(run, step):
    """The E-step's noise: a function of (seed, step, process), so a resumed run samples the same."""
    seed = run.args.seed * 1_000_003 + step * 1009 + run.rank
    return torch.Generator(run.dev).manual_seed(seed)


def open_run_dir(args, rank):
    """One run per dir, checked before any model loads: a fresh run needs an empty or new dir (or
    --overwrite), --resume needs a checkpoint and the run's own flags, and a lock keeps a second
    trainer out."""
    out = args.output_dir or os.path.join(
        "runs",
        f"{os.path.basename(args.model.rstrip('/'))}-{os.path.basename(args.dataset)}-{args.algo}",
    )
    if os.path.exists(out) and not os.path.isdir(out):
        die(f"--output-dir {out} is a file, not a directory")
    if rank != 0:
        return out, None
    try:
        os.makedirs(out, exist_ok=True)
        lock = open(os.path.join(out, ".lock"), "a")
    except OSError as e:
        die(f"cannot write to --output-dir {out}: {e.strerror}")
    try:
        # a POSIX lock: per process (a rerun in this process may retake it), gone when it ends
        fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        die(f"another trainer is running in {out} (it holds {out}/.lock)")
    held = [f for f in os.listdir(out) if f != ".lock"]
    if args.overwrite:
        for f in held:
            shutil.rmtree(os.path.join(out, f)) if os.path.isdir(
                os.path.join(out, f)
            ) else os.remove(os.path.join(out, f))
    elif held and not args.resume:
        die(
            f"{out} already holds a run: --resume continues it, --overwrite replaces it, "
            "or pick another --output-dir"
        )
    if args.resume:
        check_same_run(args, out)
    return out, lock


def check_same_run(args, out):
    """--resume continues the same run: every flag but RESUMABLE's must match the run's args.json."""
    if latest_checkpoint(out) is None:
        die(f"--resume: no checkpoint with trainer_state.pt in {out}")
    try:
        saved = json.load(open(os.path.join(out, "args.json")))
    except (OSError, ValueError):
        die(f"--resume: {out}/args.json is missing or unreadable")
    for k, v in asdict(args).items():
        if k not in RESUMABLE and k != "benchmark" and k in saved and saved[k] != v:
            die(
                f"--resume: {flag(k)} is {v!r}, the run in {out} used {saved[k]!r}; keep it, "
                "or start a new --output-dir"
            )


def progress(run):
    """The steps still to run, under a progress bar that names the phase. The first Ctrl-C finishes
    the current step and saves it (a checkpoint always holds the step its name says); a second one
    quits at once."""
    from tqdm import tqdm

    a = run.args
    run.bar = tqdm(
        total=a.steps, initial=run.start, desc=a.algo, dynamic_ncols=True, disable=run.rank > 0
    )

    def on_sigint(*_):
        if run.stop:
            raise KeyboardInterrupt
        run.stop = True
        say("\nempg: Ctrl-C: finishing this step and saving it (Ctrl-C again quits without saving)")

    main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGINT, on_sigint) if main else None
    try:
        for step in range(run.start, run.args.steps):
            yield step
            run.bar.update(1)
            if run.stop:
                run.bar.close()
                say(
                    f"empg: interrupted; step {run.saved} is saved in {run.out_dir}; continue with --resume"
                )
                sys.exit(130)
    finally:
        if old is not None:
            signal.signal(signal.SIGINT, old)
        run.bar.close()


def log_step(run, step, stats, rewards, lens, adv, comps, texts, rows, times):
    """A metrics row (and a few samples) per step, the progress bar, and the guard against a run of
    skipped steps."""
    a, N = run.args, run.args.num_samples
    if isinstance(run.decoder, StaticDecoder):
        run.decoder.measure_mstep()
    if run.world > 1:
        stats = {
            k: sum(v) / run.world for k, v in zip(stats, zip(*gather_all([[*stats.values()]])))
        }
    truncated = gather_all([len(c) == a.max_new_tokens and c[-1] not in run.eos_ids for c in comps])
    tokens = sum(gather_all([len(r["ids"]) * N for r in rows])) + int(lens.sum())
    std = rewards.std(correction=int(len(rewards) > 1)).item()  # one reward: 0, not NaN
    m = dict(step=step, reward_mean=rewards.mean().item(), reward_std=std,
             adv_abs_mean=adv.abs().mean().item(), **stats, response_len_mean=lens.float().mean().item(),
             truncated_frac=sum(truncated) / len(truncated), **times,
             estep_tok_s=int(lens.sum()) / times["estep_s"],
             mstep_tok_s=tokens * a.updates_per_batch / times["mstep_s"], lr=a.lr)  # fmt: skip
    run.metrics.append(m)
    if run.rank == 0:
        append_jsonl(os.path.join(run.out_dir, "metrics.jsonl"), [m])
        every = max(1, len(texts) // max(a.log_samples, 1))
        picked = list(range(0, len(texts), every))[: a.log_samples]
        row = lambda i: dict(step=step, prompt=rows[i // N]["prompt"], completion=texts[i],
                             answer=rows[i // N]["answer"], reward=rewards[i].item())  # fmt: skip
        append_jsonl(os.path.join(run.out_dir, "samples.jsonl"), [row(i) for i in picked])
    test = f"{run.evals[-1]['test_score']:.3f}" if run.evals else "-"
    run.bar.set_postfix(reward=f"{m['reward_mean']:.3f}", len=f"{m['response_len_mean']:.0f}",
                        loss=f"{m['loss']:.4f}", test=test)  # fmt: skip
    run.skipped_in_a_row = run.skipped_in_a_row + 1 if stats["skipped"] else 0
    if run.skipped_in_a_row >= 3:
        run.bar.close()
        die(f"3 steps in a row had a non-finite loss or gradient (NaN weights? --lr or --beta too "
            f"large?); stopped at step {step}; the last checkpoint is step {run.saved}")  # fmt: skip


def finish(run):
    """After the last step: the final test score, summary.json, and where everything went."""
    sync_theta_star(run.theta_star, run.policy)
    if run.args.eval_every:
        evaluate(run, run.args.steps)
    rewards = [m["reward_mean"] for m in run.metrics[-10:]]
    summary = dict(
        steps=run.args.steps,
        reward_last10=sum(rewards) / len(rewards) if rewards else None,
        test_score_last10=test_score(run.evals),
        step0_test_score=next((e["test_score"] for e in run.evals if e["step"] == 0), None),
        evals=len(run.evals),
        checkpoint=latest_checkpoint(run.out_dir),
        output_dir=run.out_dir,
    )
    if run.rank == 0:
        write_atomic(os.path.join(run.out_dir, "summary.json"), json.dumps(summary, indent=1))
        f = lambda x: "-" if x is None else f"{x:.3f}"
        say(
            f"empg: done, {run.args.steps} steps; reward, mean of the last 10: {f(summary['reward_last10'])}"
        )
        if run.evals:
            last10, step0 = f(summary["test_score_last10"]), f(summary["step0_test_score"])
            say(f"empg: test score (mean of the last 10 evals) {last10}; step-0 score {step0}")
        wrote = ", ".join(sorted(x for x in os.listdir(run.out_dir) if x[0] != "."))
        say(f"empg: in {run.out_dir}: {wrote}")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    if run.lock:
        run.lock.close()
    return run.out_dir


# ---- Logs and checkpoints: nothing lost, nothing half-written
def append_jsonl(path, rows):
    """One write per row (O_APPEND): a crash leaves at most a torn last line, which read_log drops."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            for r in rows:
                os.write(fd, (json.dumps(r) + "\n").encode())
        finally:
            os.close(fd)
    except OSError as e:
        die(f"cannot write {path}: {e.strerror}")


def write_atomic(path, text):
    try:
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    except OSError as e:
        die(f"cannot write {path}: {e.strerror}")


def read_log(path, keep):
    """The rows of a JSONL log that keep() accepts, rewritten through a temp file and a rename (a
    kill never leaves it half written). A torn line — a crash mid-write, a full disk — is dropped
    with a warning."""
    if not os.path.exists(path):
        return []
    rows, torn = [], 0
    for line in open(path, encoding="utf-8", errors="replace"):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            torn += 1
            continue
        rows += [row] if isinstance(row, dict) and keep(row) else []
    if torn:
        print(f"empg: warning: dropped {torn} torn line(s) from {path}", file=sys.stderr)
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
    return rows


def latest_checkpoint(out_dir):
    names = sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []
    ok = [
        d
        for d in names
        if d.startswith("checkpoint-")
        and os.path.exists(os.path.join(out_dir, d, "trainer_state.pt"))
    ]
    return os.path.join(out_dir, ok[-1]) if ok else None


def save_checkpoint(run, step):
    """checkpoint-NNNNNN/: a plain HF dir in bf16 (transformers, eval.py and vLLM load it) with the
    tokenizer and, in the newest checkpoint only, trainer_state.pt: optimizer state and fp32 master
    weights for an exact --resume with any number of processes. Written to a temp dir and renamed,
    with Ctrl-C held off until the rename is done: a checkpoint is whole and is the step it names."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions as Options
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    o = Options(full_state_dict=True, cpu_offload=True)  # gathers FSDP2 shards: a collective
    model_sd = get_model_state_dict(run.policy, options=o)
    opt_sd = get_optimizer_state_dict(run.policy, run.opt, options=o)
    if run.rank == 0:
        final, tmp = (os.path.join(run.out_dir, f"{p}checkpoint-{step:06d}") for p in ("", ".tmp-"))
        with ctrl_c_deferred():
            try:
                write_checkpoint(tmp, run, model_sd, opt_sd, step)
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
            except (OSError, RuntimeError) as e:
                shutil.rmtree(tmp, ignore_errors=True)
                why = getattr(e, "strerror", None) or str(e).splitlines()[0][:200]
                last = latest_checkpoint(run.out_dir)
                die(f"cannot write checkpoint {final} ({why}); the last whole one: {last}")
            for d in os.listdir(run.out_dir):  # optimizer state: the newest checkpoint's only
                p = os.path.join(run.out_dir, d, "trainer_state.pt")
                if (
                    d.startswith("checkpoint-")
                    and d != os.path.basename(final)
                    and os.path.exists(p)
                ):
                    os.remove(p)
    run.saved = step
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def ctrl_c_deferred():
    """SIGINT is recorded, not acted on, inside the block; on leaving it is delivered to the handler
    that was there (KeyboardInterrupt, or the trainer's "finish this step")."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got = []
    old = signal.signal(signal.SIGINT, lambda *a: got.append(a))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
        if got and callable(old):
            old(*got[0])


def write_checkpoint(path, run, model_sd, opt_sd, step):
    from transformers.utils import logging as hf_logging

    shutil.rmtree(path, ignore_errors=True)
    p = run.policy
    tied = p.get_output_embeddings().weight is p.get_input_embeddings().weight
    bf16 = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in model_sd.items()}
    if tied:  # the full state dict holds a tied weight twice; the HF dir holds it once
        bf16.pop("lm_head.weight", None)
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar inside ours
    p.save_pretrained(path, state_dict=bf16)
    cfg = json.load(open(os.path.join(path, "config.json")))
    write_atomic(
        os.path.join(path, "config.json"), json.dumps(dict(cfg, dtype="bfloat16"), indent=2)
    )
    run.tok.save_pretrained(path)
    state = dict(optimizer=opt_sd, step=step, args=asdict(run.args))
    if any(v.dtype == torch.float32 for v in model_sd.values()):
        state["master"] = model_sd  # the fp32 master weights, for an exact resume
    torch.save(state, os.path.join(path, "trainer_state.pt"))


# ---- Benchmark: where does the time go? (`--benchmark`: random prompts; a config-only --model will do)
def benchmark(args):
    """Our E-step against model.generate() on the same random prompts and lengths, then one M-step
    on those samples; one JSON line. Every row decodes to the cap (no EOS): both do the same work."""
    dev, dtype = device_and_dtype(args)
    run, res = build_models(args, dev, dtype), {}
    g = torch.Generator().manual_seed(args.seed)
    vocab = min(run.policy.config.vocab_size, 151643)  # below Qwen's special tokens
    lengths = torch.randint(64, 129, (args.prompts_per_step,), generator=g).tolist()
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]
    n, T, cuda = args.num_samples, args.max_new_tokens, dev.type == "cuda"
    # our first call allocates the KV cache (and compiles); the second is what a later step costs
    ours = lambda: sample(run.theta_star, prompts, n, T, set(), 0, args.temperature,
                          torch.Generator(dev).manual_seed(0), run.decoder)  # fmt: skip
    timed(ours, res, "ours_first_s")
    comps = timed(ours, res, "ours_s", "estep_peak_mem_gib")
    if isinstance(run.decoder, StaticDecoder):
        time_other_attention(run, prompts, n, T, res)
    run.decoder.make_room()
    gen = lambda: generate_like_sample(run.theta_star, prompts, n, T, args.temperature)
    timed(gen, res, "generate_s")
    tokens = len(prompts) * n * T
    res.update(ours_tok_s=tokens / res["ours_s"], generate_tok_s=tokens / res["generate_s"],
               speedup=res["generate_s"] / res["ours_s"])  # fmt: skip
    reps, adv = [p for p in prompts for _ in range(n)], torch.randn(len(comps))
    mstep = lambda: m_step(run.policy, run.opt, reps, comps, adv, args, None, run.autocast)
    timed(mstep, res, "mstep_s", "peak_mem_gib")
    m_tokens = (sum(map(len, reps)) + tokens) * args.updates_per_batch
    res["mstep_tok_s"] = m_tokens / res["mstep_s"]
    if cuda:
        res["mfu"] = mfu(run.policy, m_tokens, tokens * args.updates_per_batch, res["mstep_s"])
    res["greedy_equal"] = greedy_agreement(run, prompts[:32], min(T, 300))
    # --steps E-steps and M-steps of this shape (rows decoded to the cap: an upper bound)
    res["projected_run_h"] = (args.steps or 225) * (res["ours_s"] + res["mstep_s"]) / 3600
    compiled = " (compiled)" if getattr(run.decoder, "compiled", False) else ""
    res.update(sampler=type(run.decoder).__name__ + compiled, master_dtype=args.master_dtype,
               model=args.model, device=torch.cuda.get_device_name() if cuda else "cpu",
               prompts=len(prompts), num_samples=n, max_new_tokens=T,
               micro_batch_size=args.micro_batch_size,
               micro_batch_tokens=args.micro_batch_tokens)  # fmt: skip
    print(json.dumps(res))
    return res


def mfu(policy, tokens, completion_tokens, seconds, peak=989e12):
    """Model flops utilization against an H100's dense bf16 peak: 8 flops per token and weight (2
    forward, 2 checkpointed recompute, 4 backward) for the decoder on every token, and for the vocab
    projection on completion tokens only; the embedding is a lookup. Attention's own flops (a few %
    at these lengths) are left out."""
    emb, head = policy.get_input_embeddings().weight, policy.get_output_embeddings().weight
    body = sum(p.numel() for p in policy.parameters()) - head.numel()
    body -= 0 if emb is head else emb.numel()
    return 8 * (body * tokens + head.numel() * completion_tokens) / seconds / peak


def time_other_attention(run, prompts, n, T, res):
    """The same E-step with decode_attention's 'matmul' kernel: which one to keep is the GPU's call."""
    run.decoder.kv = run.decoder.valid = None  # one KV cache at a time
    other = StaticDecoder(run.theta_star, run.decoder.compiled, attention="matmul")
    estep = lambda: sample(run.theta_star, prompts, n, T, set(), 0, 1.0, None, other)
    timed(estep, res, "matmul_first_s")
    timed(estep, res, "matmul_s")
    res["matmul_tok_s"] = len(prompts) * n * T / res["matmul_s"]
    other.kv = other.valid = None
    torch.cuda.empty_cache() if torch.cuda.is_available() else None


def greedy_agreement(run, prompts, T):
    """Greedy decoding, token for token, up to each row's first EOS: the fraction of rows on which our
    decoder (compiled or not) equals model.generate() and the eager static step. 300 tokens cross a
    BLOCK boundary."""
    m, eos = run.theta_star, run.theta_star.config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos]) - {None}
    ours = sample(m, prompts, 1, T, eos, 0, 0, None, run.decoder)
    eager = sample(m, prompts, 1, T, eos, 0, 0, None, StaticDecoder(m))
    ids, mask = left_pad(prompts, 0, m.device)
    ref = m.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=T, pad_token_id=0)
    cut = lambda r: r[: next((k + 1 for k, x in enumerate(r) if x in eos), len(r))]
    ref = [cut(r) for r in ref[:, ids.shape[1] :].tolist()]
    same = lambda xs: sum(a == b for a, b in zip(ours, xs)) / len(ours)
    return dict(generate=same(ref), static=same(eager), rows=len(ours), tokens=T)


def timed(fn, res, key, peak_key=None):
    """fn() timed into res[key], with the device's peak memory into res[peak_key] on CUDA."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.time()
    out = fn()
    if cuda:
        torch.cuda.synchronize()
        res.update({peak_key: torch.cuda.max_memory_allocated() / 2**30} if peak_key else {})
    res[key] = time.time() - t
    return out


def generate_like_sample(model, prompts, n, T, temperature=1.0):
    """model.generate() on the same prompts and lengths as sample(): the obvious alternative."""
    ids, mask = left_pad(prompts, 0, model.device)
    kw = dict(top_k=0, top_p=1.0, max_new_tokens=T, min_new_tokens=T, pad_token_id=0)
    kw.update(do_sample=True, temperature=temperature) if temperature > 0 else kw.update(
        do_sample=False
    )
    return model.generate(ids, attention_mask=mask, num_return_sequences=n, **kw)


if __name__ == "__main__":
    a = parse_args()
    benchmark(a) if a.benchmark else train(a)
