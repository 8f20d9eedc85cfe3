"""EM Policy Gradient (EMPG): train an LLM to reason, in one file.

Tianbing Xu, "Training Large Language Models to Reason via EM Policy Gradient" (arXiv 2504.18587).
Algorithm 1, line by line, and the function that computes it (Part I, unless marked II):
  for each step:                                            train()
    θ* ← θ  (freeze the weights that sample)                  sync_theta_star() II
    E-step: N completions τ ~ Pθ*(τ | x) per prompt, T = 1    sample(), next_token()
    R(τ) ∈ {0, 1}: is the final answer right?                gsm8k_reward(), math_reward()
    R̃ = sigmoid((R − μ)/σ),  A = 2(R̃ − ½)                    sigmoid_normalize(), advantages(), score()
    M-step: ascend E_τ~θ*[A(τ) ∇ log Pθ(τ)]  (Eq. 12)        completion_logprobs(), empg_loss(), m_step()
  every K steps: the greedy test score                      evaluate() II
`--algo grpo` is the paper's comparator: the grpo branch of advantages(), and grpo_loss().

    python empg.py --model Qwen/Qwen2.5-1.5B [--dataset math-hard]   # GSM8K [MATH levels 3-5]
"""

import math, re, time
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
import torch.nn.functional as F

# ==================================================================================================
# PART I — ALGORITHM 1
# ==================================================================================================


# ---- Arguments: each line is a flag, with its --help, bound and --resume rule
def arg(default, help, choices="", bounds="[0, inf)", resume=False):
    kind = type(default) if default is not None else int  # None: the dataset's preset (PRESETS)
    meta = dict(help=help, choices=choices.split(), kind=kind, bounds=bounds, resume=resume)
    return field(default=default, metadata=meta)


@dataclass
class Args:
    # algorithm
    algo: str = arg("empg", "empg (Eq. 12), or grpo (the paper's comparator)", "empg grpo")
    reward_norm: str = arg("token", "R̃'s μ, σ: tokens, responses, groups", "token batch group none")
    baseline: str = arg("half", "b in A = 2(R̃ − b): ½ (author's) or mean R̃", "half mean")
    beta: float = arg(0.0, "β · KL(πθ‖π_init), k3 (author's 1.5B GSM8K job: 0.001)")
    entropy_coef: float = arg(0.0, "entropy bonus (author's 1.5B GSM8K job: 0.001)")
    clip_eps: float = arg(0.2, "PPO clip ε (grpo)", bounds="(0, 1)")
    updates_per_batch: int = arg(1, "optimizer steps per E-step", bounds="[1, inf)")
    # data and E-step
    model: str = arg("Qwen/Qwen2.5-1.5B", "hub name or local dir (a config: random weights)")
    tokenizer: str = arg("", "hub name or local dir (default: --model)")
    dataset: str = arg("gsm8k", "gsm8k, math-hard, or a .jsonl of {question, answer} rows")
    data_dir: str = arg("", "a local copy laid out like ../shared/data")
    prompt_template: str = arg("", "with a {question} placeholder (default: the dataset's)")
    max_prompt_chars: int = arg(None, "drop longer prompts (author: gsm8k 512, math-hard 1024)")
    stop_at_im_end: bool = arg(False, "end at <|im_end|> too (faster; author: at EOS)")
    steps: int = arg(None, "E-steps (default: one epoch)", bounds="[1, inf)", resume=True)
    prompts_per_step: int = arg(32, "prompts per E-step (author: 32)", bounds="[1, inf)")
    num_samples: int = arg(None, "N per prompt (author: gsm8k 2, math-hard 8)", bounds="[1, inf)")
    max_new_tokens: int = arg(
        None, "completion cap (gsm8k 1024, math-hard 3072)", bounds="[1, inf)"
    )
    temperature: float = arg(1.0, "sampling temperature, no top-k/top-p", bounds="(0, 10]")
    # M-step: AdamW, constant lr, no warmup (the author's jobs)
    lr: float = arg(1e-6, "learning rate", bounds="[0, 1)")
    weight_decay: float = arg(0.01, "AdamW weight decay", bounds="[0, 1)")
    grad_clip: float = arg(1.0, "global grad-norm clip", bounds="(0, inf)")
    # speed and memory: the results do not change
    sampler: str = arg("auto", "E-step decoder (make_decoder)", "auto compiled static hf")
    micro_batch_size: int = arg(8, "sequences per M-step forward/backward", bounds="[1, inf)")
    micro_batch_tokens: int = arg(0, "if > 0: micro-batches of ≤ this many padded tokens")
    logprob_chunk: int = arg(1024, "tokens per vocab-projection chunk", bounds="[1, inf)")
    gradient_checkpointing: str = arg("auto", "recompute activations (auto: CUDA)", "auto on off")
    dtype: str = arg("auto", "compute dtype (auto: bf16 on CUDA)", "auto bf16 fp32")
    master_dtype: str = arg("fp32", "weights, AdamW state (bf16: AdamWSR)", "fp32 bf16")
    device: str = arg("auto", "auto, cuda, cuda:N or cpu")
    memory_probe: str = arg("auto", "the worst step before step 0 (auto: CUDA)", "auto on off")
    # evaluation: the paper's test score
    eval_every: int = arg(5, "greedy test score at step 0, every K, at the end", resume=True)
    eval_limit: int = arg(0, "the first N held-out problems (0: all)", resume=True)
    eval_dataset: str = arg("", "held-out set (default: the dataset's test split)", resume=True)
    eval_rows: int = arg(0, "greedy rows a batch (0: what fits, ≤ 512)", resume=True)
    # I/O
    seed: int = arg(0, "data order and sampling", bounds="[0, 2147483647]")
    output_dir: str = arg("", "the run's dir (default: runs/MODEL-DATASET-ALGO)")
    save_every: int = arg(50, "checkpoint every K steps", bounds="[1, inf)", resume=True)
    log_samples: int = arg(4, "completions a step into samples.jsonl", resume=True)
    report_to: str = arg("none", "also log to", "none tensorboard wandb", resume=True)
    resume: bool = arg(False, "continue the --output-dir run", resume=True)
    overwrite: bool = arg(False, "delete what --output-dir holds", resume=True)
    benchmark: bool = arg(False, "time the E- and M-step; print JSON", resume=True)


# The author's jobs (../shared/reference/paper.md; math-hard's 3072: the paper's text); a flag wins.
PRESETS = {
    "gsm8k": dict(num_samples=2, max_new_tokens=1024, max_prompt_chars=512),
    "math-hard": dict(num_samples=8, max_new_tokens=3072, max_prompt_chars=1024),
}
OURS = dict(num_samples=8, max_new_tokens=1024, max_prompt_chars=0)


# ---- Graders: load_problems() (Part II) gives rows {question, answer}, prompted by the templates
def hash_answer(text):
    """The author's strict rule, the first `#### (-?[0-9.,]+)`: '#### 18.' ≠ '18'; '####18': None."""
    m = re.search(r"#### (\-?[0-9\.\,]+)", text)
    return m.group(1).replace(",", "").replace("$", "") if m else None


def final_answer(answer):
    """The number after a GSM8K solution's '####', else the answer as given."""
    return (hash_answer(answer) or answer.split("####")[-1].strip()) if "####" in answer else answer


def gsm8k_reward(completion, answer):
    """1.0 iff the strict rule reads the reference number (as strings, as the author's)."""
    return float(hash_answer(completion) == final_answer(answer).replace(",", ""))


def math_reward(completion, answer, verify=True):
    """1.0 iff the answer (last \\boxed{} → '####' → last number) of the text before the first
    <|im_end|> or <|endoftext|> (the author's cut) is math-verify-equal to the reference."""
    pred = extract_answer(re.split(r"<\|im_end\|>|<\|endoftext\|>", completion)[0])
    return float(pred is not None and answers_equal(pred, final_answer(answer), verify))


REWARDS = {"gsm8k": gsm8k_reward, "math": math_reward}


# ---- E-step: N completions per prompt from the frozen θ*
def next_token(logits, temperature, generator=None):
    """Greedy at T = 0, else a sample of softmax(logits / T) by inversion: the first token whose
    cumulative probability (fp64: each mass exact) passes U ~ Uniform(0, 1)."""
    if temperature == 0:
        return logits.argmax(-1)
    cdf = torch.softmax(logits.float() / temperature, -1).double().cumsum_(-1)
    u = torch.rand(len(cdf), 1, dtype=cdf.dtype, device=cdf.device, generator=generator)
    tok = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
    return tok.squeeze(-1).clamp_(max=cdf.shape[-1] - 1)


@torch.no_grad()
def sample(decoder, prompts, n, max_new_tokens, eos_ids, pad_id, temperature=1.0, generator=None):
    """n completions (token ids) per prompt from the decoder's θ*: row i·n + j is prompt i's j-th,
    ending at its first EOS or cut at max_new_tokens. Prompts are left-padded: a token a column."""
    dev = decoder.model.device
    logits = decoder.prefill(*left_pad(prompts, pad_id, dev), n, max_new_tokens)
    eos = torch.tensor(sorted(eos_ids), device=dev)
    out = torch.full((len(logits), max_new_tokens), pad_id, dtype=torch.long, device=dev)
    done = torch.zeros(len(logits), dtype=torch.bool, device=dev)
    for t in range(max_new_tokens):
        new = next_token(logits, temperature, generator).masked_fill(done, pad_id)
        out[:, t] = new
        done |= torch.isin(new, eos)
        if t == max_new_tokens - 1 or (t % 8 == 7 and done.all()):  # a sync: every 8th token
            break
        logits = decoder.decode(new)
    rows = out[:, : t + 1].tolist()
    return [r[: next((j + 1 for j, x in enumerate(r) if x in eos_ids), len(r))] for r in rows]


# ---- Reward → R̃ → advantages
def sigmoid_normalize(rewards, norm="token", group_size=None, lengths=None):
    """R̃ = sigmoid((R − μ)/sqrt(σ² + 1e-8)), σ² unbiased, over 'token': response tokens, each with
    its response's R (author's code); 'batch': responses (paper's text); 'group': a prompt's N
    samples; 'none': R̃ = R. All-equal R: z = 0, not NaN."""
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


def advantages(
    rewards, group_size, algo="empg", reward_norm="token", baseline="half", lengths=None
):
    """EMPG: A = 2(R̃ − b), b = ½ (the author's 2·sigmoid(z) − 1) or mean R̃. GRPO: A = z per group."""
    if algo == "grpo":
        r = rewards.float().reshape(-1, group_size)
        z = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-6)
        return z.reshape(rewards.shape)
    rt = sigmoid_normalize(rewards, reward_norm, group_size, lengths)
    return 2 * (rt - (0.5 if baseline == "half" else rt.mean()))


def score(rewards, lengths, args):
    """Rewards, lengths → advantages, and metrics for metrics.jsonl. A new idea goes here: shape the
    rewards, zero the advantages of samples to skip, add a metric."""
    adv = advantages(rewards, args.num_samples, args.algo, args.reward_norm, args.baseline, lengths)
    metrics = dict(
        reward_mean=rewards.mean().item(),
        reward_std=rewards.std(correction=int(len(rewards) > 1)).item(),  # one reward: 0, not NaN
        adv_abs_mean=adv.abs().mean().item(),
        response_len_mean=lengths.float().mean().item(),
    )
    return adv, metrics


# ---- M-step: log-probs, the losses, one optimizer step
def completion_logprobs(model, input_ids, attention_mask, completion_mask, temperature=1.0,
                        chunk=1024, with_entropy=False):  # fmt: skip
    """(log πθ(y_t | x, y_<t) at temperature T, entropy or None), (B, width) fp32, of completion tokens
    (EOS included; 0 elsewhere) in [left-padded prompt | right-padded completion]."""
    pos = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    kw = dict(use_cache=False, logits_to_keep=1, output_hidden_states=True)  # no (B, L, V) logits
    h = model(input_ids, attention_mask, pos, **kw).hidden_states[-1]
    sel, width = completion_mask.bool(), completion_mask.shape[1]
    h, y = h[:, -width - 1 : -1][sel], input_ids[:, -width:][sel]  # state t predicts token t + 1
    w = model.get_output_embeddings().weight
    flat = vocab_logprobs(h, y, w, temperature, chunk, with_entropy)
    per_token = [torch.zeros(sel.shape, device=h.device).masked_scatter(sel, x) for x in flat.T]
    return per_token[0], per_token[1] if with_entropy else None


def seq_mean(x, mask):
    """Mean over each sequence's completion."""
    return (x * mask).sum(-1) / mask.sum(-1).clamp(min=1)


# Loss aggregation, the author's: a token mean per sequence, then a mean over sequences. Eq. 12's
# log P(τ) is a sum over tokens; the mean scales each trajectory by 1/|τ|, so one long rambling
# completion cannot outweigh short correct ones.
def empg_loss(logp, mask, adv):
    """L = −mean_τ [A(τ) · mean_t log πθ(y_t)] (Eq. 12, token-averaged): REINFORCE on R̃."""
    return -seq_mean(adv[:, None] * logp, mask).mean()


def grpo_loss(logp, old_logp, mask, adv, clip_eps=0.2):
    """PPO-clip surrogate, ratio ρ = πθ/πθ*: −mean_τ mean_t min(ρA, clip(ρ, 1 ± ε)A)."""
    ratio, a = torch.exp(logp - old_logp), adv[:, None]
    surr = torch.minimum(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)
    return -seq_mean(surr, mask).mean()


def kl_k3(logp, ref_logp):
    """k3 estimate of KL(πθ‖π_ref) per token, e^r − r − 1 (r = ref − logp), clamped to ±10 as the
    author's (r's ±20 only keeps e^r finite)."""
    r = (ref_logp - logp).clamp(-20, 20)
    return (torch.exp(r) - r - 1).clamp(-10, 10)


def micro_batch_loss(logp, old_logp, ref_logp, entropy, mask, adv, args):
    """Eq. 12 (or GRPO's) + β·KL(πθ‖π_init) − c·entropy on a micro-batch; its parts."""
    zero = logp.new_zeros(())
    if args.algo == "grpo":
        loss = grpo_loss(logp, old_logp, mask, adv, args.clip_eps)
        ratio, a = (logp.detach() - old_logp).exp(), adv[:, None]  # clip_frac as verl: where the
        clipped = ratio.clamp(1 - args.clip_eps, 1 + args.clip_eps) * a < ratio * a  # min clips
        clip = seq_mean(clipped.float(), mask).mean()
    else:
        loss, clip = empg_loss(logp, mask, adv), zero
    kl = seq_mean(kl_k3(logp, ref_logp), mask).mean() if ref_logp is not None else zero
    ent = seq_mean(entropy, mask).mean() if entropy is not None else zero
    loss = loss + args.beta * kl - args.entropy_coef * ent
    return loss, dict(loss=loss.detach(), kl=kl.detach(), entropy=ent.detach(), clip_frac=clip)


def optimizer_step(policy, opt, grad_clip, loss_finite=True):
    """Clip the grad norm and step; a non-finite loss or gradient skips it."""
    norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), grad_clip)
    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP2: a DTensor
    skipped = not (loss_finite and math.isfinite(norm))
    if not skipped:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return norm, skipped


def m_step(policy, opt, prompts, comps, adv, args, ref=None, autocast=None, pad_id=0):
    """M-step (Eq. 12): `updates_per_batch` optimizer steps on one E-step's samples (the last one's
    stats returned); a micro-batch's loss weighs its share of the batch: the cut does not matter."""
    dev, n, with_entropy = policy.device, len(comps), args.entropy_coef > 0
    autocast, adv = autocast or torch.autocast(dev.type, enabled=False), adv.to(dev)
    mbs = micro_batches(prompts, comps, args.micro_batch_size, args.micro_batch_tokens)
    old = {}  # θ*'s log-probs for GRPO's ratio: free, the first pass runs at θ = θ*
    policy.train()
    for _ in range(args.updates_per_batch):
        tot = dict(loss=0, kl=0, entropy=0, clip_frac=0)  # on the device: a sync a step
        for j, mb in enumerate(mbs):
            ids, attn, cmask = collate(
                [prompts[i] for i in mb], [comps[i] for i in mb], pad_id, dev
            )
            with autocast:
                logp, ent = completion_logprobs(
                    policy, ids, attn, cmask, args.temperature, args.logprob_chunk, with_entropy
                )
            ref_logp = None
            if ref is not None:
                with torch.no_grad(), autocast:
                    ref_logp, _ = completion_logprobs(ref, ids, attn, cmask, args.temperature)
            old.setdefault(j, logp.detach())
            loss, parts = micro_batch_loss(logp, old[j], ref_logp, ent, cmask, adv[mb], args)
            (loss * len(mb) / n).backward()
            tot = {k: tot[k] + v * len(mb) / n for k, v in parts.items()}
        tot = {k: float(v) for k, v in tot.items()}
        grad_norm, skipped = optimizer_step(policy, opt, args.grad_clip, math.isfinite(tot["loss"]))
    return dict(tot, grad_norm=grad_norm, step_skipped=int(skipped))


# ---- The run's objects, and the loop: Algorithm 1
def make_run(args):
    """The run's objects, in the order a mistake should surface (loaders: Part II)."""
    rank, world = init_distributed(args)  # torchrun: G processes, each samples 1/G of the prompts
    dev, dtype = device_and_dtype(args)  # bf16 compute on CUDA
    out_dir, lock, state = open_run_dir(args, rank)  # state: the checkpoint's, on --resume
    policy = load_policy(args, dev, state)  # θ in the master dtype (fp32: a 1e-6 step moves it)
    tok = load_tokenizer(args.tokenizer or args.model)
    theta_star = frozen_copy(policy, dtype) if dtype != policy.dtype or world > 1 else policy
    ref = load_reference(args, dev, dtype, policy, state) if args.beta > 0 else None
    opt = make_optimizer(policy, args, dev, state, world)  # AdamW; FSDP2-sharded under torchrun
    rows, task = load_train_rows(args, tok, policy)
    run = SimpleNamespace(
        args=args, rank=rank, world=world, dev=dev, out_dir=out_dir, lock=lock, tok=tok, task=task,
        policy=policy, theta_star=theta_star, ref=ref, opt=opt, rows=rows, pad_id=tok.pad_token_id,
        decoder=make_decoder(theta_star, args.sampler, args.master_dtype),
        autocast=torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32),
        eos_ids=stop_ids(tok, theta_star, args.stop_at_im_end),
    )  # fmt: skip
    load_eval_rows(run)  # the held-out set
    open_logs(run, state)  # the logs, cut back to the checkpoint's step on --resume
    fit_memory(run, state)  # the worst step first: what fits, what is freed or halved
    return run


def train(args):
    run = make_run(args)
    a, tok, policy, theta_star, ref = args, run.tok, run.policy, run.theta_star, run.ref
    rank, N, k = run.rank, args.num_samples, args.prompts_per_step // run.world
    with guarded(run):  # Ctrl-C: the step finishes and is saved; out of memory: one line
        for step in progress(run):  # step = E-steps (batches) done so far
            # ---- θ* ← θ: freeze the weights that sample (and take the test score)
            sync_theta_star(theta_star, policy)
            if a.eval_every and step % a.eval_every == 0:
                evaluate(run, step)
            # ---- E-step: N completions per prompt from θ*, for this process's k prompts
            run.phase("sampling")
            t0, gen, comps = time.time(), sampling_generator(a.seed, step, rank, run.dev), []
            order = step_prompts(step, len(run.rows), a.prompts_per_step, a.seed)
            batch = [run.rows[i] for i in order][rank * k : (rank + 1) * k]
            for part in chunks(batch, run.estep_prompts):  # one chunk unless memory is short
                comps += sample(run.decoder, [r["ids"] for r in part], N, a.max_new_tokens,
                                run.eos_ids, run.pad_id, a.temperature, gen)  # fmt: skip
            # ---- reward R(τ) ∈ {0,1} → R̃ → A, statistics over the batch (all processes)
            run.phase("grading")
            texts = tok.batch_decode(comps)  # special tokens kept: the MATH grader cuts at them
            local = [REWARDS[run.task](c, batch[i // N]["answer"]) for i, c in enumerate(texts)]
            lengths = torch.tensor(gather_all([len(c) for c in comps]))
            adv, metrics = score(torch.tensor(gather_all(local)), lengths, a)
            # ---- M-step (Eq. 12): a step up Σ A(τ) ∇ log Pθ(τ); then discard the samples
            run.phase("training")
            t1 = time.time()
            if not run.keep_cache:  # no room for the KV cache during the M-step (fit_memory)
                run.decoder.free_cache()
            prompts = [r["ids"] for r in batch for _ in range(N)]
            my_adv = adv[rank * k * N : (rank + 1) * k * N]  # this process's samples
            stats = m_step(
                policy, run.opt, prompts, comps, my_adv, a, ref, run.autocast, run.pad_id
            )
            # ---- log and save
            times = dict(estep_s=t1 - t0, mstep_s=time.time() - t1)
            log_step(run, step + 1, metrics, stats, times, batch, texts, comps, local)
            if (step + 1) % a.save_every == 0 or step + 1 == a.steps or run.stop:
                save_checkpoint(run, step + 1)
        return finish(run)


# ==================================================================================================
# PART II — SPEED, MEMORY, SCALE, I/O: skip on first read (measured figures: the README's speed part)
# ==================================================================================================
import argparse, contextlib, dataclasses, functools, json, os, pickle, shutil, signal, sys, threading

import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

PROG = "empg"


# ---- The command line: a flag per field of Args (or eval.py's EvalArgs), presets resolved
def parse_args(argv=None, spec=Args, prog="empg"):
    global PROG
    PROG, fields = prog, dataclasses.fields(spec)  # errors name the program the user ran
    doc, fmt = sys.modules[spec.__module__].__doc__, argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(description=doc, formatter_class=fmt)
    resumable = ", ".join(flag(f.name) for f in fields if f.metadata["resume"])
    p.epilog = f"--resume keeps the run's flags but {resumable}" if spec is Args else None
    p.error = die  # one line, not argparse's usage block
    for f in fields:
        m = f.metadata
        kw = dict(type=m["kind"], default=f.default, choices=m["choices"] or None)
        kw = dict(action="store_true") if f.type is bool else kw
        kw = dict(action="append", default=[]) if f.type is list else kw
        default = {None: "the dataset's preset", "": "none"}.get(f.default, f.default)
        help = m["help"] + ("" if "default" in m["help"] else f" (default: {default})")
        p.add_argument(flag(f.name), help=help, **kw)
    a = spec(**vars(p.parse_args(argv)))
    for k, v in PRESETS.get(a.dataset, OURS).items() if spec is Args else ():
        setattr(a, k, v if getattr(a, k) is None else getattr(a, k))
    for f in fields:
        if not in_bounds(getattr(a, f.name), f.metadata["bounds"]):
            die(f"{flag(f.name)} must be in {f.metadata['bounds']}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", a.device):
        die("--device must be auto, cpu, cuda or cuda:N")
    if "{question}" not in (a.prompt_template or "{question}"):
        die("--prompt-template has no {question}")
    if spec is not Args:
        return a
    if a.num_samples < 2 and (a.algo == "grpo" or a.reward_norm == "group"):
        die("--algo grpo and --reward-norm group need --num-samples >= 2")
    if a.master_dtype == "bf16" and a.dtype == "fp32":
        die("--master-dtype bf16 computes in bf16, not --dtype fp32")
    if a.resume and a.overwrite:
        die("--resume and --overwrite contradict each other")
    return a


def in_bounds(v, bounds):
    """v in an interval such as "[1, inf)"; not a number or None (a preset's, later): True; NaN: False."""
    if type(v) not in (int, float):
        return True
    lo, hi = map(float, bounds[1:-1].split(","))
    return (lo < v if bounds[0] == "(" else lo <= v) and (v < hi if bounds[-1] == ")" else v <= hi)


def flag(name):
    return "--" + name.replace("_", "-")


def say(msg):
    if os.environ.get("RANK", "0") == "0":
        print(f"{PROG}: {msg}", file=sys.stderr)


def die(msg):
    """One line on stderr (from the first process), no traceback, exit 2."""
    if os.environ.get("RANK", "0") != "0":
        time.sleep(3)  # torchrun stops every process once one exits: let the first one print
    say(f"error: {msg}")
    sys.exit(2)


# ---- The E-step's decoders: the model's own forward (any architecture), or ours (qwen2/llama) on a
# KV cache allocated once, eager or compiled into CUDA graphs
BLOCK = 256  # the KV cache is allocated and read BLOCK columns at a time: few shapes, few graphs


def make_decoder(model, sampler="auto", master_dtype="fp32"):
    """auto: compiled on CUDA; static on CPU and with bf16 master weights (whose cache is freed before
    each M-step; a CUDA graph wants it kept); hf for other architectures."""
    c = model.config
    ours = c.model_type in ("qwen2", "llama") and not getattr(c, "use_sliding_window", False)
    if sampler == "auto":
        sampler = "static" if model.device.type != "cuda" or master_dtype == "bf16" else "compiled"
        sampler = sampler if ours else "hf"
    if sampler != "hf" and not ours:
        die(f"--sampler {sampler} knows qwen2/llama without a sliding window, not {c.model_type}")
    return PlainDecoder(model) if sampler == "hf" else StaticDecoder(model, sampler == "compiled")


def left_pad(seqs, pad_id, device):
    width = max(map(len, seqs))
    ids = [[pad_id] * (width - len(s)) + s for s in seqs]
    mask = [[0] * (width - len(s)) + [1] * len(s) for s in seqs]
    return torch.tensor(ids, device=device), torch.tensor(mask, device=device)


def prefill(model, ids, mask, n):
    """The prompts through the model's forward once: the last logits, repeated n times, and the cache."""
    from transformers import DynamicCache

    cache, pos = DynamicCache(config=model.config), (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(ids, mask, pos, cache, logits_to_keep=1).logits[:, -1]
    return logits.repeat_interleave(n, 0), cache, pos[:, -1:].repeat_interleave(n, 0)


class PlainDecoder:
    """The reference: the model's own forward on a growing KV cache."""

    def __init__(self, model):
        self.model, self.cache = model, None

    def prefill(self, ids, mask, n, max_new_tokens):
        logits, self.cache, self.pos = prefill(self.model, ids, mask, n)
        self.cache.batch_repeat_interleave(n)  # each prompt prefilled once, its K/V shared n ways
        self.mask = mask.repeat_interleave(n, 0)
        return logits

    def decode(self, tok):
        self.pos = self.pos + 1
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(tok), 1)], 1)
        return self.model(tok[:, None], self.mask, self.pos, self.cache).logits[:, -1]

    def free_cache(self):
        self.cache = None


def rope(x, cos, sin):
    x1, x2 = x.chunk(2, -1)  # HF's rotate-half layout
    return x * cos + torch.cat((-x2, x1), -1) * sin


def decode_step(model, kv, valid, tok, pos, col, width):
    """Logits after tok (R,) at pos (R, 1), K/V written at cache column col (a tensor: the column
    moves, the graph does not); attention reads the filled `width` columns, each KV head once."""
    m, R = model.model, tok.shape[0]
    x = m.embed_tokens(tok[:, None])  # (R, 1, D)
    cos, sin = m.rotary_emb(x, pos)
    valid.index_fill_(1, col, True)
    for layer, (K, V) in zip(m.layers, kv):  # K, V: (R, KV heads, L, d)
        a, h = layer.self_attn, layer.input_layernorm(x)
        q = rope(a.q_proj(h).view(R, -1, a.head_dim), cos, sin)  # (R, H, d)
        K.index_copy_(2, col, rope(a.k_proj(h).view(R, -1, a.head_dim), cos, sin)[:, :, None])
        V.index_copy_(2, col, a.v_proj(h).view(R, -1, 1, a.head_dim))
        q = q.view(R, K.shape[1], -1, a.head_dim)  # (R, KV heads, H/KV, d)
        o = F.scaled_dot_product_attention(
            q, K[:, :, :width], V[:, :, :width], valid[:, None, None, :width], scale=a.scaling
        )
        x = x + a.o_proj(o.reshape(R, 1, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.get_output_embeddings()(m.norm(x))[:, 0]


class StaticDecoder:
    """decode_step on K/V buffers allocated once and kept: fixed shapes and addresses, so compiled=True
    captures CUDA graphs, one per BLOCK-wide window and allocation (the recompile limit's bound)."""

    def __init__(self, model, compiled=False):
        self.model, self.compiled, self.kv, self.valid = model, compiled, None, None
        self.fn, self.graph_bound = decode_step, 0
        if compiled:  # dynamic=False: one graph per shape, a bound we can count
            kw = dict(mode="reduce-overhead", fullgraph=True, dynamic=False)
            self.fn = torch.compile(decode_step, **kw)

    def allocate(self, rows, length, like):
        if self.valid is not None and self.valid.shape[0] == rows and self.valid.shape[1] >= length:
            return
        self.free_cache()  # never the old cache and the new one at once
        shape = (rows, like.shape[1], -(-length // BLOCK) * BLOCK, like.shape[-1])
        self.kv = [(like.new_zeros(shape), like.new_zeros(shape)) for _ in self.model.model.layers]
        self.valid = torch.zeros(rows, shape[2], dtype=torch.bool, device=like.device)
        for t in (self.valid, *(x for pair in self.kv for x in pair)):
            torch._dynamo.mark_static_address(t)  # CUDA graphs keep pointers to these
        if self.compiled:  # one new graph per window width the new cache is read at
            self.graph_bound += shape[2] // BLOCK
            cfg = torch._dynamo.config
            cfg.recompile_limit = max(cfg.recompile_limit, self.graph_bound)
            cfg.fail_on_recompile_limit_hit = True  # past the bound: our warning, not silence

    def prefill(self, ids, mask, n, max_new_tokens):
        logits, cache, self.pos = prefill(self.model, ids, mask, n)
        P = ids.shape[1]
        self.allocate(len(logits), P + max_new_tokens, cache.layers[0].keys)
        for (K, V), layer in zip(self.kv, cache.layers):  # prefilled once, copied to n rows
            K[:, :, :P] = layer.keys.repeat_interleave(n, 0)
            V[:, :, :P] = layer.values.repeat_interleave(n, 0)
        self.valid.zero_()[:, :P] = mask.bool().repeat_interleave(n, 0)
        self.col, self.filled = torch.full((1,), P - 1, device=ids.device), P - 1
        return logits

    def decode(self, tok):
        self.pos += 1
        self.col += 1
        self.filled += 1
        width = min(self.valid.shape[1], (self.filled // BLOCK + 1) * BLOCK)
        args = (self.model, self.kv, self.valid, tok, self.pos, self.col, width)
        if self.compiled:
            torch.compiler.cudagraph_mark_step_begin()  # the last logits are consumed
        try:
            return self.fn(*args)
        except Exception as e:  # no Triton, an unsupported op, the bound hit: carry on eagerly
            if not self.compiled:
                raise
            say(f"warning: torch.compile failed ({type(e).__name__}); decoding eagerly")
            self.compiled, self.fn = False, decode_step
            return decode_step(*args)  # writing the same cache column again is harmless

    def free_cache(self):
        self.kv = self.valid = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ---- The M-step's machinery: chunked vocab projection, micro-batches
def logprob_and_entropy(h, y, weight, temperature):
    logp = (F.linear(h, weight).float() / temperature).log_softmax(-1)
    return torch.stack([logp.gather(-1, y[:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)], -1)


class TokenLogprob(torch.autograd.Function):
    """log softmax(h Wᵀ / T)[y] for a chunk of tokens, its backward by hand: (onehot − softmax)/T,
    from logits recomputed there. Only h, y and the logsumexp are kept: no (n × vocab) tensor
    outlives a call, and three passes over the vocab instead of log_softmax's eight (profiled)."""

    @staticmethod
    def forward(ctx, h, y, weight, temperature):
        device = h.device.type  # the backward recomputes under the forward's autocast
        ctx.amp = torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)
        logits = F.linear(h, weight).float()
        logits = logits if temperature == 1 else logits / temperature  # T = 1: no pass at all
        lse = logits.logsumexp(-1)
        ctx.save_for_backward(h, y, weight, lse)
        ctx.temperature = temperature
        return logits.gather(-1, y[:, None]).squeeze(-1) - lse

    @staticmethod
    def backward(ctx, grad):
        h, y, weight, lse = ctx.saved_tensors
        with torch.autocast(h.device.type, dtype=ctx.amp[1], enabled=ctx.amp[0]):
            g = F.linear(h, weight).float()
            g = g if ctx.temperature == 1 else g.div_(ctx.temperature)
            scale = grad[:, None] / ctx.temperature
            g = g.sub_(lse[:, None]).exp_().mul_(-scale)  # −softmax · grad/T
            g = g.scatter_add_(-1, y[:, None], scale)  # + onehot · grad/T
            return (g @ weight).to(h.dtype), None, (g.T @ h).to(weight.dtype), None


def vocab_logprobs(h, y, weight, temperature, chunk, with_entropy):
    """log p(y) [and entropy], (N, 1 or 2), `chunk` tokens at a time and recomputed in backward:
    never the (N × vocab) fp32 logits at once."""
    parts = []
    for hs, ys in zip(h.split(chunk), y.split(chunk)):  # h empty: one empty part
        if with_entropy:  # the entropy's gradient: autograd through log_softmax, recomputed
            kw = dict(use_reentrant=False)
            parts.append(checkpoint(logprob_and_entropy, hs, ys, weight, temperature, **kw))
        else:
            parts.append(TokenLogprob.apply(hs, ys, weight, temperature)[:, None])
    return torch.cat(parts)


def collate(prompts, completions, pad_id, device):
    """[left-padded prompt | right-padded completion] ids, attention mask and completion mask."""
    P, width = max(map(len, prompts)), max(max(map(len, completions)), 1)
    ids = torch.full((len(prompts), P + width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, P - len(p) : P + len(c)] = torch.tensor(p + c)
        attn[i, P - len(p) : P + len(c)] = 1
    return ids.to(device), attn.to(device), attn[:, P:].float().to(device)


def micro_batches(prompts, comps, size, tokens=0):
    """Indices, longest first, `size` a micro-batch, or (tokens > 0) count × padded length ≤ tokens."""
    order = sorted(range(len(comps)), key=lambda i: len(prompts[i]) + len(comps[i]), reverse=True)
    mbs = [[]]
    for i in order:
        grown = mbs[-1] + [i]
        longest = max(len(prompts[j]) for j in grown) + max(len(comps[j]) for j in grown)
        if len(grown) == 1 or (len(grown) * longest <= tokens if tokens else len(grown) <= size):
            mbs[-1] = grown
        else:
            mbs.append([i])
    # FSDP2's collectives pair up across processes: all run as many micro-batches as the busiest
    target = max(gather_all([len(mbs)]))  # a collective: once
    while len(mbs) < target:
        i = max(range(len(mbs)), key=lambda j: len(mbs[j]))  # the largest, split in two
        mbs[i : i + 1] = [mbs[i][: len(mbs[i]) // 2], mbs[i][len(mbs[i]) // 2 :]]
    return mbs


def chunks(xs, size):
    return [xs[i : i + size] for i in range(0, len(xs), size)]


# ---- bf16 master weights: AdamW with stochastic rounding
def stochastic_round(x, generator=None):
    """fp32 → bf16, rounding up with probability equal to the remainder, so E[result] = x: noise
    added to the 16 low bits that bf16 cuts."""
    kw = dict(dtype=torch.int32, device=x.device, generator=generator)
    noise = torch.randint(0, 1 << 16, x.shape, **kw)
    return ((x.view(torch.int32) + noise) & -65536).view(torch.float32).to(torch.bfloat16)


class AdamWSR(torch.optim.Optimizer):
    """AdamW for bf16 master weights: weights, grads, moments in bf16 (8 bytes a parameter, not 16).
    Updates are computed in fp32 and stochastically rounded: round-to-nearest would erase every step
    under half a bf16 spacing (at lr 1e-6, all of them). On fp32 weights: plain AdamW."""

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
                    st.update(
                        step=torch.tensor(0.0),
                        exp_avg=torch.zeros_like(p),
                        exp_avg_sq=torch.zeros_like(p),
                    )
                t = int(st["step"].add_(1))
                if gen is None:  # noise from (seed, step): a resumed run rounds the same
                    gen = torch.Generator(p.device).manual_seed(self.seed * 1_000_003 + t)
                tensors = (p, p.grad, st["exp_avg"], st["exp_avg_sq"])
                for w, g, m, v in zip(*(x.view(-1).split(chunk) for x in tensors)):
                    g, m32, v32 = g.float(), m.float(), v.float()
                    m32.lerp_(g, 1 - b1)
                    v32.mul_(b2).addcmul_(g, g, value=1 - b2)
                    upd = (m32 / (1 - b1**t)) / ((v32 / (1 - b2**t)).sqrt() + eps)
                    w32 = w.float().mul_(1 - lr * wd).sub_(lr * upd)
                    # the moments round stochastically too: v's 0.1 % steps are below half a
                    # bf16 spacing (0.4 %) and would stall it
                    for dst, src in ((m, m32), (v, v32), (w, w32)):
                        dst.copy_(stochastic_round(src, gen) if p.dtype == torch.bfloat16 else src)


def make_optimizer(policy, args, dev, state=None, world=1):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if world > 1:
        shard(policy, device_and_dtype(args)[1])
    kw = dict(lr=args.lr, weight_decay=args.weight_decay)
    if args.master_dtype == "bf16":
        opt = AdamWSR(policy.parameters(), **kw, seed=args.seed)
    else:
        opt = torch.optim.AdamW(policy.parameters(), **kw, fused=dev.type == "cuda" or None)
    if state is not None:
        opts = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(policy, opt, state["optimizer"], options=opts)
    return opt


# ---- Models, devices, θ*
def device_and_dtype(args):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(dev if args.device == "auto" else args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        die(f"--device {args.device} but no CUDA GPU is visible")
    bf16_master = getattr(args, "master_dtype", "fp32") == "bf16"  # (eval.py has no such flag)
    bf16 = args.dtype == "bf16" or (args.dtype == "auto" and (dev.type == "cuda" or bf16_master))
    if bf16 and dev.type == "cpu" and not torch.cpu._is_avx512_bf16_supported() and not bf16_master:
        die("--dtype bf16 on a CPU without native bf16 (AVX512-BF16); use --dtype fp32")
    return dev, torch.bfloat16 if bf16 else torch.float32


@functools.cache
def hub_offline():
    """The local cache only when the hub does not answer in 3 s: a load then fails at once, not after
    ~25 s of retries a file."""
    import socket

    import huggingface_hub.constants as hub

    try:
        socket.create_connection((hub.ENDPOINT.split("/")[2], 443), timeout=3).close()
    except OSError:
        hub.HF_HUB_OFFLINE = True
        say("warning: the Hugging Face hub is unreachable; using the local cache only")
    return hub.HF_HUB_OFFLINE


def load_pretrained(load, what, name, **kw):
    """load(name, **kw) from a local dir or the hub, any failure one line."""
    if (os.path.isabs(name) or name.startswith(".")) and not os.path.isdir(name):
        die(f"cannot load {what} {name!r}: no such directory")
    offline = not os.path.isdir(name) and hub_offline()
    try:
        return load(name, **kw)
    except (OSError, ValueError, RuntimeError, KeyError, ImportError) as e:
        hint = "; the hub is unreachable: pass a local dir" if offline else ""
        die(f"cannot load {what} {name!r}: {(str(e) or type(e).__name__).splitlines()[0]}{hint}")


def load_model(name, device, dtype=torch.float32, insist_cpu=False):
    """A hub name or a local dir; a dir with a config and no weights gives random weights (tests)."""
    from transformers import AutoConfig, AutoModelForCausalLM as Auto

    cfg = load_pretrained(AutoConfig.from_pretrained, "model", name)
    with torch.device("meta"):
        n = sum(p.numel() for p in Auto.from_config(cfg).parameters())
    if device.type == "cpu" and n >= 1e9 and not insist_cpu:
        die(f"no CUDA GPU: a {n / 1e9:.1f}B model on a CPU takes days; pass --device cpu to insist")
    files = os.listdir(name) if os.path.isdir(name) else [".safetensors"]
    if not any(f.endswith((".safetensors", ".bin")) for f in files):
        torch.manual_seed(0)
        return Auto.from_config(cfg, dtype=dtype).to(device)
    return load_pretrained(Auto.from_pretrained, "model", name, dtype=dtype).to(device)


def load_tokenizer(name):
    from transformers import AutoTokenizer

    tok = load_pretrained(AutoTokenizer.from_pretrained, "tokenizer", name)
    tok.pad_token = tok.pad_token or tok.eos_token
    return tok


def load_policy(args, dev, state):
    from transformers.utils import logging

    logging.disable_progress_bar()  # one progress bar: ours
    master = torch.bfloat16 if args.master_dtype == "bf16" else torch.float32
    policy = load_model(state["dir"] if state else args.model, dev, master, args.device == "cpu")
    if state and "master" in state:  # the checkpoint's files are bf16
        policy.load_state_dict(state["master"])
    gc = args.gradient_checkpointing
    if gc == "on" or (gc == "auto" and dev.type == "cuda"):
        new_name = getattr(policy, "activation_checkpointing_enable", None)  # newer transformers
        enable = new_name or policy.gradient_checkpointing_enable
        enable({"use_reentrant": False})  # either's first parameter
    policy.config.use_cache = False
    return policy


def load_reference(args, dev, dtype, policy, state):
    """π_init: the weights the run started from (on --resume: --model again)."""
    if state is None:
        return frozen_copy(policy, dtype)
    return load_model(args.model, dev, dtype, True).requires_grad_(False)


def frozen_copy(policy, dtype):
    """The policy, frozen, built in the compute dtype and filled tensor by tensor: no fp32 transient
    (a deepcopy then .to(bf16) costs 6 GB for 1.5B)."""
    from copy import deepcopy

    from transformers import AutoModelForCausalLM

    with torch.device(policy.device):
        twin = AutoModelForCausalLM.from_config(deepcopy(policy.config), dtype=dtype)
    twin.load_state_dict(policy.state_dict())
    return twin.eval().requires_grad_(False)


@torch.no_grad()
def sync_theta_star(theta_star, policy):
    """θ* ← θ, a parameter at a time (FSDP2: each all-gathered in turn); eval mode (no dropout, and
    gradient checkpointing would turn the decoder's KV cache off)."""
    theta_star.eval()
    if theta_star is not policy:
        for ps, p in zip(theta_star.parameters(), policy.parameters()):
            ps.copy_(p.full_tensor() if hasattr(p, "full_tensor") else p)


def stop_ids(tok, model, im_end=False):
    """The ids that end a completion: the tokenizer's and model's EOS (the base model's
    <|endoftext|>, as the author's rollouts), and <|im_end|> with --stop-at-im-end."""
    ids = {tok.eos_token_id}
    for src in (model.config, model.generation_config):
        e = getattr(src, "eos_token_id", None)
        ids |= set(e if isinstance(e, list) else [e])
    if im_end and "<|im_end|>" in tok.get_vocab():
        ids.add(tok.convert_tokens_to_ids("<|im_end|>"))
    return ids - {None}


# ---- Many GPUs: `torchrun --nproc-per-node G empg.py ...` runs G copies of this file. Each samples
# its share of the prompts with a full θ*; the M-step shards θ, grads and AdamW state (FSDP2).
def init_distributed(args):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if args.prompts_per_step % world:
        die(f"--prompts-per-step {args.prompts_per_step} is not divisible by the {world} processes")
    if args.master_dtype == "bf16":
        die("--master-dtype bf16 is for one process; under torchrun FSDP2 shards fp32 weights")
    cuda = torch.cuda.is_available() and args.device != "cpu"
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), world


def gather_all(xs):
    """A per-process list concatenated over all processes in rank order (= one process's order)."""
    if not dist.is_initialized():
        return xs
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, xs)
    return [x for o in out for x in o]


def shard(model, dtype):
    import warnings

    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for layer in model.base_model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)


# ---- Data: the hub or local files, the author's prompt filter, tokenized once
GSM8K_TEMPLATE = '{question} Let\'s think step by step and output the final answer after "####".'
MATH_TEMPLATE = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{question}\n"
    "Please reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def read_jsonl(path):
    """[(line number, row)] of a JSONL file; anything unreadable is one line and exit 2."""
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        die(f"cannot read {path}: {getattr(e, 'strerror', None) or e}")
    rows = []
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line) if line.strip() else {}
        except json.JSONDecodeError as e:
            die(f"{path}:{n} is not valid JSON ({e.msg})")
        if not isinstance(row, dict):
            die(f"{path}:{n} is not a JSON object")
        rows += [(n, row)] if row else []
    return rows or die(f"{path} has no rows")


def level(row):
    """A MATH row's level, 1-5 ("Level 3" on the hub, 3 in local files; 0 if unknown)."""
    digit = str(row.get("level", "5"))[-1]
    return int(digit) if digit.isdigit() else 0


def rows_of(data_dir, files, hub_names):
    if data_dir:
        return [r for f in files for _, r in read_jsonl(os.path.join(data_dir, f))]
    offline = hub_offline()
    try:
        import datasets

        return [r for *name, split in hub_names for r in datasets.load_dataset(*name, split=split)]
    except Exception as e:
        why = "the hub is unreachable" if offline else type(e).__name__
        die(f"cannot load {hub_names[0][0]} from the Hugging Face hub ({why}); use --data-dir DIR")


def problem(row, where):
    q, a = row.get("question", row.get("problem", row.get("prompt"))), row.get("answer")
    if not isinstance(q, str) or not q.strip():
        die(f"{where}: needs a non-empty 'question' (or 'problem'/'prompt') string")
    a = int(a) if isinstance(a, float) and a.is_integer() else a
    if type(a) not in (str, int) or not str(a).strip():
        die(f"{where}: 'answer' must be a non-empty string or a number, not {json.dumps(a)[:40]}")
    return {"question": q, "answer": final_answer(str(a))}


def load_problems(dataset, split="train", data_dir=""):
    """Rows {question, answer} and the grader ('gsm8k' or 'math'); datasets: the README's."""
    if dataset.endswith(".jsonl"):
        return [problem(r, f"{dataset}:{n}") for n, r in read_jsonl(dataset)], "math"
    if dataset not in ("gsm8k", "math-hard", "math500", "math-hard-l5"):
        die(f"unknown dataset {dataset!r}: use gsm8k, math-hard, math500, math-hard-l5 or a .jsonl")
    if dataset == "gsm8k":
        rows = rows_of(data_dir, [f"gsm8k/{split}.jsonl"], [("openai/gsm8k", "main", split)])
        return [problem(r, f"gsm8k {split} row {n}") for n, r in enumerate(rows, 1)], "gsm8k"
    lighteval = "DigitalLearningGmbH/MATH-lighteval"
    if dataset == "math-hard-l5":
        rows = rows_of(data_dir, ["math/hard_test.jsonl"], [(lighteval, "test")])
        rows = [r for r in rows if level(r) == 5]
    else:  # MATH-500: math500, math-hard's test set, and what math-hard's train set leaves out
        rows = rows_of(data_dir, ["math/math500_test.jsonl"], [("HuggingFaceH4/MATH-500", "test")])
    if dataset == "math-hard" and split == "train":  # the author's "MATH HARD" train set, rebuilt
        test, splits = {r["problem"] for r in rows}, [(lighteval, "train"), (lighteval, "test")]
        rows = rows_of(data_dir, ["math/train.jsonl", "math/test.jsonl"], splits)
        rows = [r for r in rows if level(r) >= 3 and r["problem"] not in test]
    answers = [r.get("answer") or last_boxed(r["solution"]) or "" for r in rows]
    return [dict(question=r["problem"], answer=a) for r, a in zip(rows, answers)], "math"


def keep_short(rows, template, max_chars):
    """The author's filter, train and test: the prompt has at most max_chars characters (0: all).
    GSM8K: 7473 → 7230 train (225 steps of 32), 1319 → 1265 test; MATH-500: 500 → 496."""
    rows = [dict(r, prompt=template.replace("{question}", r["question"])) for r in rows]
    return [r for r in rows if not max_chars or len(r["prompt"]) <= max_chars]


def prepare(rows, tok, template, max_chars, model, max_new_tokens, what):
    """keep_short(), then each prompt tokenized once; a prompt the model cannot hold, or ids beyond
    its vocabulary, stop the run with one line."""
    rows = keep_short(rows, template, max_chars)
    if not rows:
        die(f"no {what} prompt is within --max-prompt-chars {max_chars}")
    ids = tok([r["prompt"] for r in rows], add_special_tokens=False)["input_ids"]
    longest, top, cfg = max(map(len, ids)), max(max(x, default=0) for x in ids), model.config
    context = getattr(cfg, "max_position_embeddings", None) or math.inf
    if longest + max_new_tokens > context:
        die(
            f"a {what} prompt of {longest} tokens + --max-new-tokens {max_new_tokens} exceeds the "
            f"model's context ({context}): lower --max-prompt-chars or --max-new-tokens"
        )
    if top >= cfg.vocab_size:
        die(
            f"the tokenizer gives id {top}, beyond the model's vocabulary ({cfg.vocab_size}): "
            "wrong --tokenizer?"
        )
    return [dict(r, ids=i) for r, i in zip(rows, ids)]


def default_template(dataset, task):
    if dataset.endswith(".jsonl"):
        return "{question}"
    return GSM8K_TEMPLATE if task == "gsm8k" else MATH_TEMPLATE


def load_rows(a, name, split, tok, model):
    """A dataset's split through the author's filter, tokenized; and its grader."""
    raw, task = load_problems(name, split, a.data_dir)
    template = a.prompt_template or default_template(name, task)
    return prepare(raw, tok, template, a.max_prompt_chars, model, a.max_new_tokens, split), task


def load_train_rows(args, tok, model):
    """--steps defaults to one epoch, drop-last."""
    rows, task = load_rows(args, args.dataset, "train", tok, model)
    args.steps = args.steps or max(1, len(rows) // args.prompts_per_step)
    return rows, task


def step_prompts(step, n_rows, k, seed):
    """Row indices for a step: consecutive slices of a fresh permutation per epoch, a function of
    (seed, step): a resumed run sees the same data order."""
    idx = range(step * k, step * k + k)
    gens = {e: torch.Generator().manual_seed(seed + e) for e in {j // n_rows for j in idx}}
    perms = {e: torch.randperm(n_rows, generator=g) for e, g in gens.items()}
    return [perms[j // n_rows][j % n_rows].item() for j in idx]


def sampling_generator(seed, step, rank, device):
    """The E-step's noise, a function of (seed, step, process): a resumed run samples the same."""
    return torch.Generator(device).manual_seed(seed * 1_000_003 + step * 1009 + rank)


# ---- Graders' helpers, and the test score's grade (eval.py imports it)
def extract_answer(completion):
    """The lenient cascade: last \\boxed{} → '####' however spaced → last number."""
    m = re.search(r"####\s*\$?\s*(-?[\d,]*\.?\d+)", completion)
    return last_boxed(completion) or (m and m.group(1).replace(",", "")) or last_number(completion)


def grade(completion, answer, task, verify=True):
    """A completion's test-score grade, in-run and in eval.py: `correct` is the training reward's
    rule, `lenient` the free-form cascade (on GSM8K the gap is format learning), `extracted` what
    `correct` read (maj@k votes by it)."""
    lenient = bool(math_reward(completion, answer, verify))
    if task == "gsm8k":
        correct = bool(gsm8k_reward(completion, answer))
        return dict(extracted=hash_answer(completion), correct=correct, lenient=lenient)
    return dict(extracted=extract_answer(completion), correct=lenient, lenient=lenient)


def last_boxed(text):
    """Content of the last \\boxed{...} (or \\fbox{...}), braces matched; None if there is none."""
    i = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    j = text.find("{", i)
    if i < 0 or j < 0 or text[i:j].strip() not in ("\\boxed", "\\fbox"):
        m = re.match(r"\\boxed ([^\s$]+)", text[i:]) if i >= 0 else None  # "\boxed 2"
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
def parse_answer(s):
    """math-verify's parse, cached: maj@k never parses the same string twice."""
    from math_verify import parse

    return parse(f"\\boxed{{{s}}}", parsing_timeout=5)


def answers_equal(pred, ref, verify=True):
    """math-verify equivalence (parse 5 s + verify 5 s at most; an error or time-out: not equal).
    verify=False: equal strings only."""
    if pred.strip() == ref.strip() or not verify:
        return pred.strip() == ref.strip()
    try:
        from math_verify import verify

        gold, got = parse_answer(ref), parse_answer(pred)
        return bool(gold and got and verify(gold, got, timeout_seconds=5))
    except Exception:
        return False


# ---- The test score during the run; memory: the worst step met first
def load_eval_rows(run):
    """run.eval_rows: --eval-dataset, else the training set's test split; none for a .jsonl."""
    a, run.eval_rows, run.eval_task = run.args, [], None
    name = a.eval_dataset or ("" if a.dataset.endswith(".jsonl") else a.dataset)
    if a.eval_every and name:
        rows, run.eval_task = load_rows(a, name, "test", run.tok, run.policy)
        run.eval_rows = rows[: a.eval_limit or None]


def eager_decoder(decoder, model):
    """The E-step decoder's kind, eager: graphs on a cache freed each time would be captured each time."""
    return make_decoder(model, "hf" if isinstance(decoder, PlainDecoder) else "static")


@torch.no_grad()
def evaluate(run, step):
    """The paper's test score, greedy, graded as eval.py grades. → eval.jsonl"""
    if not run.eval_rows or any(e["step"] == step for e in run.evals):
        return
    a, t0, rows = run.args, time.time(), run.eval_rows[run.rank :: run.world]
    decoder, grades, lens = eager_decoder(run.decoder, run.theta_star), [], []
    for i, part in enumerate(chunks(rows, run.eval_batch)):
        run.phase(f"eval {i * run.eval_batch}/{len(rows)}")
        ids = [r["ids"] for r in part]
        comps = sample(decoder, ids, 1, a.max_new_tokens, run.eos_ids, run.pad_id, 0)
        texts = run.tok.batch_decode(comps)  # as in train(): the MATH grader cuts at them
        grades += [grade(t, r["answer"], run.eval_task)["correct"] for t, r in zip(texts, part)]
        lens += [len(c) for c in comps]
    decoder.free_cache()
    grades, lens = gather_all(grades), gather_all(lens)
    row = dict(step=step, test_score=sum(grades) / len(grades), mean_len=sum(lens) / len(lens))
    row.update(n=len(grades), batch_rows=run.eval_batch, seconds=time.time() - t0)
    run.evals.append(row)
    log_row(run, "eval.jsonl", row)
    if run.rank == 0:
        plot_curves(run)  # redrawn at each evaluation, and at the end


def fit_memory(run, state):
    """The memory choices: the checkpoint's on --resume (the same samples), else probed, else the flags'."""
    a, cuda = run.args, run.dev.type == "cuda"
    fit = dict(
        estep_prompts=a.prompts_per_step // run.world,
        keep_cache=True,
        micro_batch_size=a.micro_batch_size,
        micro_batch_tokens=a.micro_batch_tokens,
        eval_batch=min(a.eval_rows or 512, len(run.eval_rows) or 1),
    )
    if state and "fit" in state:  # the same samples; --eval-rows may change
        rows = min(a.eval_rows or state["fit"]["eval_batch"], len(run.eval_rows) or 1)
        fit = dict(state["fit"], eval_batch=rows)
    elif a.memory_probe == "on" or (a.memory_probe == "auto" and cuda):
        probe_memory(run, fit)
    else:
        say(f"memory probe skipped ({'--memory-probe off' if cuda else 'no CUDA'})")
    run.__dict__.update(fit, fit=fit)
    a.micro_batch_size, a.micro_batch_tokens = fit["micro_batch_size"], fit["micro_batch_tokens"]
    if not fit["keep_cache"] and getattr(run.decoder, "compiled", False):
        run.decoder.compiled, run.decoder.fn = False, decode_step  # a new cache a step: no graphs


def probe_memory(run, fit):
    """The worst step first. What does not fit: fewer E-step prompts at a time (a divisor of this
    process's share), then the KV cache freed before each M-step, then the micro-batch halved.
    (--sampler hf grows its cache while decoding: only the prompts' part is met here.)"""
    N, dev, pad, new = run.args.num_samples, run.dev, run.pad_id, run.args.max_new_tokens
    P = max(len(r["ids"]) for r in run.rows + run.eval_rows)
    key = "micro_batch_tokens" if run.args.micro_batch_tokens else "micro_batch_size"
    mem = torch.cuda.memory_allocated if dev.type == "cuda" else int
    k = run.args.prompts_per_step // run.world  # this process's prompts, in equal slices below
    start, fill = mem(), run.decoder.prefill
    while not fits(fill, *left_pad([[pad] * P] * fit["estep_prompts"], pad, dev), N, new):
        if fit["estep_prompts"] == 1:
            die(f"out of memory: {N} rows of {P} + {new} tokens do not fit the E-step")
        # a divisor of k: every slice the same shape, so one KV cache (and graph set) serves them
        fit["estep_prompts"] = max(d for d in range(1, fit["estep_prompts"] // 2 + 1) if k % d == 0)
    kv = mem() - start
    while True:  # an M-step forward + backward on a micro-batch of the longest sequences
        rows = max(1, fit[key] // (P + new)) if key == "micro_batch_tokens" else fit[key]
        if fits(probe_m_step, run, rows, P):
            break
        if fit["keep_cache"]:  # first the KV cache goes before each M-step
            fit["keep_cache"] = False
            run.decoder.free_cache()
        elif rows == 1:
            die(f"out of memory: one sequence of {P} + {new} tokens does not fit the M-step")
        else:
            fit[key] //= 2
    gib = "not measured on a CPU"
    if dev.type == "cuda":  # evaluation: rows of full length in what is left beside the cache
        free = torch.cuda.mem_get_info()[0] + torch.cuda.memory_reserved() - mem()
        rows = int(0.8 * (free - 2 * size(run.policy)) * fit["estep_prompts"] * N / max(kv, 1))
        fit["eval_batch"] = max(1, min(fit["eval_batch"], rows))
        total = torch.cuda.get_device_properties(dev).total_memory
        g = [f"{x / 2**30:.1f}" for x in (size(run.policy), kv, run.peak, total)]
        gib = f"weights {g[0]}, AdamW 2×, KV cache {g[1]}, M-step peak {g[2]} of {g[3]} GiB"
    say(
        f"memory: {gib}; chose: E-step {fit['estep_prompts']} prompts at a time, {flag(key)} "
        f"{fit[key]}, KV cache {'kept' if fit['keep_cache'] else 'freed'} in the M-step, eval "
        f"{fit['eval_batch']} rows"
    )


def probe_m_step(run, rows, P):
    """An M-step forward + backward on full-length sequences, AdamW's moments held meanwhile (made
    at the first step); run.peak: its peak above the start."""
    a, pad, cuda = run.args, run.pad_id, run.dev.type == "cuda"
    start = torch.cuda.memory_allocated() if cuda else 0
    params = [] if run.opt.state else list(run.policy.parameters())
    moments = [torch.empty_like(p) for p in params + params]
    torch.cuda.reset_peak_memory_stats() if cuda else None
    ids, attn, cmask = collate([[pad] * P] * rows, [[pad] * a.max_new_tokens] * rows, pad, run.dev)
    try:
        run.policy.train()
        with run.autocast:
            logp, ent = completion_logprobs(
                run.policy, ids, attn, cmask, 1, a.logprob_chunk, a.entropy_coef > 0
            )
        (logp.sum() + (0 if ent is None else ent.sum())).backward()
    finally:
        run.policy.zero_grad(set_to_none=True)
        del moments
    run.peak = torch.cuda.max_memory_allocated() - start if cuda else 0


def fits(fn, *args):
    try:
        fn(*args)
        return True
    except torch.OutOfMemoryError:
        return False


def size(model):
    return sum(p.numel() * p.element_size() for p in model.parameters())


# ---- The run's dir, progress, logs and checkpoints: nothing lost, nothing half-written
def open_run_dir(args, rank):
    """One run a dir, checked before any model loads: a new run needs an empty dir (or --overwrite);
    a lock keeps a second trainer out. → (dir, lock, the checkpoint's state on --resume)"""
    import fcntl

    model, data = os.path.basename(args.model.rstrip("/")), os.path.basename(args.dataset)
    out, lock = args.output_dir or f"runs/{model}-{data}-{args.algo}", None
    if os.path.exists(out) and not os.path.isdir(out):
        die(f"--output-dir {out} is a file, not a directory")
    if rank == 0:
        try:
            os.makedirs(out, exist_ok=True)
            lock = open(os.path.join(out, ".lock"), "a")
        except OSError as e:
            die(f"cannot write to --output-dir {out}: {e.strerror}")
        try:  # a POSIX lock, gone with the process
            fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            die(f"another trainer is running in {out} (it holds {out}/.lock)")
        held = [os.path.join(out, f) for f in os.listdir(out) if f != ".lock"]
        for f in held if args.overwrite else ():
            shutil.rmtree(f) if os.path.isdir(f) else os.remove(f)
        if held and not (args.resume or args.overwrite):
            die(f"{out} already holds a run: --resume continues it, --overwrite replaces it")
    return out, lock, resume_state(args, out) if args.resume else None


def resume_state(args, out):
    """The newest checkpoint's trainer_state.pt, if the run's flags are these (but those that may
    change): tensors, numbers and strings only (weights_only: a planted object cannot run code),
    memory-mapped (no copy per process)."""
    ckpt = latest_checkpoint(out) or die(f"--resume: no checkpoint with trainer_state.pt in {out}")
    try:
        saved = json.load(open(os.path.join(out, "args.json")))
    except (OSError, ValueError):
        die(f"--resume: {out}/args.json is missing or unreadable")
    for f in dataclasses.fields(Args):
        was, now = saved.get(f.name, getattr(args, f.name)), getattr(args, f.name)
        if was != now and not f.metadata["resume"]:
            die(f"--resume: {flag(f.name)} is {now!r}, the run in {out} used {was!r}")
    path = os.path.join(ckpt, "trainer_state.pt")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, OSError) as e:
        die(f"--resume: refused {path}: {str(e).splitlines()[0][:160]}")
    return dict(state, dir=ckpt)


def open_logs(run, state):
    """The logs cut back to the checkpoint a run resumes from (a step-s evaluation comes after
    checkpoint s) and kept for the summaries; args.json; the --report-to writer."""
    a, start = run.args, state["step"] if state else 0
    run.start = run.saved = start
    run.stop, run.skipped_in_a_row, run.bar, run.writer = False, 0, None, None
    run.phase = lambda what: run.bar and run.bar.set_description_str(f"{a.algo}: {what}")
    run.metrics, run.evals = [], []
    if run.rank:
        return
    run.metrics = read_log(os.path.join(run.out_dir, "metrics.jsonl"), start + 1)
    run.evals = read_log(os.path.join(run.out_dir, "eval.jsonl"), start)
    read_log(os.path.join(run.out_dir, "samples.jsonl"), start + 1)
    write_atomic(
        os.path.join(run.out_dir, "args.json"), json.dumps(dataclasses.asdict(a), indent=1)
    )
    try:
        if a.report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            run.writer = SummaryWriter(os.path.join(run.out_dir, "tensorboard"))
        elif a.report_to == "wandb":
            import wandb

            run.writer = wandb.init(project="empg", dir=run.out_dir, config=dataclasses.asdict(a))
    except ImportError:
        die(f"--report-to {a.report_to} needs it installed: pip install {a.report_to}")


def log_row(run, name, row):
    """A row of metrics.jsonl or eval.jsonl, and its scalars to --report-to (first process)."""
    if run.rank:
        return
    append_jsonl(os.path.join(run.out_dir, name), [row])
    scalars = {f"{name.split('.')[0]}/{k}": v for k, v in row.items() if k != "step"}
    if run.args.report_to == "tensorboard":
        for k, v in scalars.items():
            run.writer.add_scalar(k, v, row["step"])
        run.writer.flush()
    elif run.writer:
        run.writer.log(scalars, step=row["step"])


def log_step(run, step, metrics, stats, times, batch, texts, comps, rewards):
    a, N = run.args, run.args.num_samples
    if run.world > 1:
        stats = dict(
            zip(stats, (sum(v) / run.world for v in zip(*gather_all([[*stats.values()]]))))
        )
    cut = gather_all([len(c) == a.max_new_tokens and c[-1] not in run.eos_ids for c in comps])
    new_tokens = metrics["response_len_mean"] * len(cut)
    tokens = (
        sum(gather_all([len(r["ids"]) * N for r in batch])) + new_tokens
    ) * a.updates_per_batch
    m = dict(step=step, **metrics, **stats, truncated_frac=sum(cut) / len(cut), **times)
    m.update(
        estep_tok_s=new_tokens / times["estep_s"], mstep_tok_s=tokens / times["mstep_s"], lr=a.lr
    )
    run.metrics.append(m)
    log_row(run, "metrics.jsonl", m)
    picked = range(0, len(texts), max(1, len(texts) // max(a.log_samples, 1)))[: a.log_samples]
    rows = [
        dict(
            step=step,
            prompt=batch[i // N]["prompt"],
            completion=texts[i],
            answer=batch[i // N]["answer"],
            reward=rewards[i],
        )
        for i in picked
    ]
    if run.rank == 0 and rows:
        append_jsonl(os.path.join(run.out_dir, "samples.jsonl"), rows)
    test = f"{run.evals[-1]['test_score']:.3f}" if run.evals else "-"
    run.bar.set_postfix(
        reward=f"{m['reward_mean']:.3f}", len=f"{m['response_len_mean']:.0f}", test=test
    )
    run.skipped_in_a_row = run.skipped_in_a_row + 1 if stats["step_skipped"] else 0
    if run.skipped_in_a_row >= 3:
        run.bar.close()
        die(
            f"3 steps in a row had a non-finite loss or gradient (--lr or --beta too large? NaN "
            f"weights?); stopped at step {step}; the last checkpoint is step {run.saved}"
        )


def progress(run):
    """The steps to run, under a bar that names the phase; after a Ctrl-C's step, exit 130."""
    from tqdm import tqdm

    run.bar = tqdm(
        total=run.args.steps, initial=run.start, desc=run.args.algo, disable=run.rank > 0
    )
    for step in range(run.start, run.args.steps):
        yield step
        run.bar.update(1)
        if run.stop:
            run.bar.close()
            say(f"interrupted; step {run.saved} is saved in {run.out_dir}; continue with --resume")
            sys.exit(130)
    run.bar.close()


@contextlib.contextmanager
def guarded(run):
    """The first Ctrl-C finishes the step and saves it (a second quits at once); out of memory is
    one line naming what to lower, the newest checkpoint untouched."""

    def on_sigint(*_):
        if run.stop:
            raise KeyboardInterrupt
        run.stop = True
        say("Ctrl-C: finishing this step and saving it (Ctrl-C again quits without saving)")

    main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGINT, on_sigint) if main else None
    try:
        yield
    except torch.OutOfMemoryError:
        run.bar.close()
        die(
            f"out of memory after step {run.bar.n}: lower --micro-batch-tokens (or -size), "
            f"--max-new-tokens or --eval-rows; checkpoint {run.saved} is whole: --resume continues"
        )
    finally:
        if old is not None:
            signal.signal(signal.SIGINT, old)


def finish(run):
    sync_theta_star(run.theta_star, run.policy)
    if run.args.eval_every:
        evaluate(run, run.args.steps)
    rewards = [m["reward_mean"] for m in run.metrics[-10:]]
    s = dict(steps=run.args.steps, reward_last10=sum(rewards) / max(len(rewards), 1))
    scores = [e["test_score"] for e in run.evals[-10:]]  # the paper's number
    s.update(test_score_last10=sum(scores) / len(scores) if scores else None, evals=len(run.evals))
    s["step0_test_score"] = next((e["test_score"] for e in run.evals if e["step"] == 0), None)
    s.update(checkpoint=latest_checkpoint(run.out_dir), output_dir=run.out_dir)
    if run.rank == 0:
        write_atomic(os.path.join(run.out_dir, "summary.json"), json.dumps(s, indent=1))
        plot_curves(run)
        say(f"done, {run.args.steps} steps; reward, mean of the last 10: {s['reward_last10']:.3f}")
        if run.evals:
            say(
                f"test score (mean of the last 10 evals) {s['test_score_last10']:.3f}; "
                f"step-0 score {s['step0_test_score'] or 0:.3f}"
            )
        wrote = sorted(x for x in os.listdir(run.out_dir) if x[0] != ".")
        say(f"in {run.out_dir}: {', '.join(wrote)}")
        if run.writer:
            run.writer.close() if run.args.report_to == "tensorboard" else run.writer.finish()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    if run.lock:
        run.lock.close()
    return run.out_dir


def append_jsonl(path, rows):
    """A write a row (line-buffered): a crash leaves at most a torn last line, which read_log drops."""
    try:
        with open(path, "a", buffering=1) as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    except OSError as e:
        die(f"cannot write {path}: {e.strerror}")


def write_atomic(path, text):
    try:
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    except OSError as e:
        die(f"cannot write {path}: {e.strerror}")


def read_log(path, before):
    """A JSONL log's rows of the steps before `before`, rewritten atomically; torn lines dropped."""
    if not os.path.exists(path):
        return []
    rows, torn = [], 0
    for line in open(path, encoding="utf-8", errors="replace"):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            torn += 1
    if torn:
        say(f"warning: dropped {torn} torn line(s) from {path}")
    rows = [r for r in rows if isinstance(r, dict) and r.get("step", 0) < before]
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
    return rows


def latest_checkpoint(out_dir):
    names = [d for d in os.listdir(out_dir) if d.startswith("checkpoint-")]
    done = [d for d in names if os.path.exists(f"{out_dir}/{d}/trainer_state.pt")]
    return os.path.join(out_dir, max(done)) if done else None


def save_checkpoint(run, step):
    """checkpoint-NNNNNN/: a plain bf16 HF dir; the newest also holds trainer_state.pt for an exact
    --resume. Written to a temp dir and renamed, Ctrl-C held off: a checkpoint is whole."""
    from torch.distributed.checkpoint import state_dict as sd

    o = sd.StateDictOptions(full_state_dict=True, cpu_offload=True)  # FSDP2: a collective
    weights = sd.get_model_state_dict(run.policy, options=o)
    opt = sd.get_optimizer_state_dict(run.policy, run.opt, options=o)
    state = dict(optimizer=opt, step=step, fit=run.fit)
    if any(v.dtype == torch.float32 for v in weights.values()):
        state["master"] = weights  # fp32 master weights: the files are bf16
    final, tmp = (os.path.join(run.out_dir, f"{p}checkpoint-{step:06d}") for p in ("", ".tmp-"))
    with ctrl_c_deferred():
        try:
            if run.rank == 0:
                write_checkpoint(tmp, run, weights, state)
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
        except (OSError, RuntimeError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            why = getattr(e, "strerror", None) or str(e).splitlines()[0][:200]
            die(
                f"cannot write {final} ({why}); the last whole one: {latest_checkpoint(run.out_dir)}"
            )
    for d in os.listdir(run.out_dir) if run.rank == 0 else ():  # the newest holds the state
        old = os.path.join(run.out_dir, d, "trainer_state.pt")
        if d.startswith("checkpoint-") and d != os.path.basename(final) and os.path.exists(old):
            os.remove(old)
    run.saved = step
    if dist.is_initialized():
        dist.barrier()


def write_checkpoint(path, run, weights, state):
    p = run.policy
    bf16 = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in weights.items()}
    if p.get_output_embeddings().weight is p.get_input_embeddings().weight:
        bf16.pop("lm_head.weight", None)  # a tied weight, held twice in the full state dict
    p.save_pretrained(path, state_dict=bf16)
    cfg = json.load(open(os.path.join(path, "config.json")))
    write_atomic(
        os.path.join(path, "config.json"), json.dumps(dict(cfg, dtype="bfloat16"), indent=2)
    )
    run.tok.save_pretrained(path)
    torch.save(state, os.path.join(path, "trainer_state.pt"))


@contextlib.contextmanager
def ctrl_c_deferred():
    """SIGINT recorded, not acted on, inside the block; on leaving, delivered to the handler."""
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


# The paper's EMPG test score along a run, read off its figures (../shared/reference/paper.md)
PAPER_CURVES = {
    ("Qwen2.5-1.5B", "gsm8k"): [(0, 0.245), (20, 0.675), (50, 0.70), (225, 0.745)],
    ("Qwen2.5-1.5B", "math-hard"): [(0, 0.018), (25, 0.42), (80, 0.56), (225, 0.58)],
    ("Qwen2.5-7B", "gsm8k"): [(0, 0.638), (20, 0.85), (50, 0.87), (225, 0.89)],
    ("Qwen2.5-Math-7B", "gsm8k"): [(0, 0.006), (35, 0.006), (65, 0.73), (100, 0.90), (225, 0.92)],
    ("Qwen2.5-Math-7B", "math-hard"): [(0, 0.595), (10, 0.71), (30, 0.76), (225, 0.81)],
}


def plot_curves(run):
    from matplotlib.figure import Figure  # no pyplot: no backend switched under a notebook

    a, model = run.args, os.path.basename(run.args.model.rstrip("/"))
    keys = ("step", "reward_mean", "response_len_mean", "truncated_frac", "estep_s", "mstep_s")
    m = {k: [r[k] for r in run.metrics] for k in keys}
    e = {k: [r[k] for r in run.evals] for k in ("step", "test_score", "seconds")}
    total = sum(m["estep_s"] + m["mstep_s"])
    unit, per = (
        ("hours", 3600) if total > 7200 else ("minutes", 60) if total > 120 else ("seconds", 1)
    )
    fig = Figure(figsize=(15, 4), layout="tight")
    ax = fig.subplots(1, 3)
    ax[0].plot(m["step"], m["reward_mean"], label="training reward (samples at T)")
    ax[0].plot(e["step"], e["test_score"], "o-", label="test score (greedy)")
    paper = PAPER_CURVES.get((model, a.dataset))
    if paper:
        ax[0].plot(*zip(*paper), "k+:", label="the paper's EMPG test score")
    ax[1].plot(m["step"], m["response_len_mean"], label="mean response length")
    ax[1].plot([], [], "r:", label="truncated at --max-new-tokens (right)")
    twin = ax[1].twinx()
    twin.plot(m["step"], m["truncated_frac"], "r:")
    twin.set(ylim=(0, 1.05), ylabel="fraction truncated")
    spans = ((m, "estep_s", "E-step"), (m, "mstep_s", "M-step"), (e, "seconds", "evaluation"))
    for x, k, what in spans:
        ax[2].plot(x["step"], torch.tensor(x[k], dtype=torch.float64).cumsum(0) / per, label=what)
    titles = ("Is it learning?", "Response length", "Where the time goes")
    for x, title, y in zip(ax, titles, ("reward, score", "tokens", f"{unit}, cumulative")):
        x.set(title=title, xlabel="step", ylabel=y)
        x.set_ylim(0, 1.15 * x.get_ylim()[1])
        x.legend(fontsize=8)
    fig.suptitle(f"{a.algo}: {model} on {os.path.basename(a.dataset)}")
    fig.savefig(os.path.join(run.out_dir, "curves.png"), dpi=80)


# ---- Benchmark (`--benchmark`: random prompts; a config-only --model will do)
def benchmark(args):
    """Rows decode to the cap (no EOS): the same work for ours and generate(), an upper bound."""
    dev, dtype = device_and_dtype(args)
    policy = load_policy(args, dev, None)
    theta_star = frozen_copy(policy, dtype) if dtype != policy.dtype else policy
    decoder = make_decoder(theta_star, args.sampler, args.master_dtype)
    n, T, g = args.num_samples, args.max_new_tokens, torch.Generator().manual_seed(args.seed)
    vocab = min(policy.config.vocab_size, 151643)  # below Qwen's special tokens
    lengths = torch.randint(64, 129, (args.prompts_per_step,), generator=g).tolist()
    prompts = [torch.randint(0, vocab, (k,), generator=g).tolist() for k in lengths]
    res, tokens = {}, len(prompts) * n * T
    sampler = functools.partial(sample, decoder, prompts, n, T, set(), 0, args.temperature)
    timed(sampler, res, "ours_first_s")  # allocates the KV cache (and compiles)
    comps = timed(sampler, res, "ours_s", "estep_peak_mem_gib")  # what a later step costs
    decoder.free_cache()
    for cache in ("dynamic", "static"):  # a first call compiles the static one on CUDA
        generate = functools.partial(
            generate_like_sample, theta_star, prompts, n, T, cache, args.temperature
        )
        timed(generate, res, f"generate_{cache}_first_s")
        timed(generate, res, f"generate_{cache}_s")
        res[f"generate_{cache}_tok_s"] = tokens / res[f"generate_{cache}_s"]
        res[f"speedup_vs_{cache}"] = res[f"generate_{cache}_s"] / res["ours_s"]
    res["ours_tok_s"] = tokens / res["ours_s"]
    opt, reps = make_optimizer(policy, args, dev), [p for p in prompts for _ in range(n)]
    autocast = torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32)
    m_step_once = functools.partial(m_step, policy, opt, reps, comps, torch.randn(len(comps)), args)
    timed(functools.partial(m_step_once, autocast=autocast), res, "mstep_s", "peak_mem_gib")
    m_tokens = (sum(map(len, reps)) + tokens) * args.updates_per_batch
    res["mstep_tok_s"] = m_tokens / res["mstep_s"]
    if dev.type == "cuda":
        res["mfu"] = mfu(policy, m_tokens, tokens * args.updates_per_batch, res["mstep_s"])
    res.update(project(args, theta_star, prompts, res, decoder))
    res.update(
        device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
        sampler=type(decoder).__name__ + " (compiled)" * getattr(decoder, "compiled", False),
        model=args.model,
        master_dtype=args.master_dtype,
        prompts=len(prompts),
        num_samples=n,
        max_new_tokens=T,
    )
    print(json.dumps(res))
    return res


def mfu(policy, tokens, completion_tokens, seconds, peak=989e12):
    """Against an H100's bf16 peak: 8 flops a token and weight (2 forward, 2 recompute, 4 backward),
    the vocab projection on completion tokens only, the embedding a lookup, no attention."""
    emb, head = policy.get_input_embeddings().weight, policy.get_output_embeddings().weight
    body = sum(p.numel() for p in policy.parameters()) - head.numel()
    body -= 0 if emb is head else emb.numel()
    return 8 * (body * tokens + head.numel() * completion_tokens) / seconds / peak


def timed(fn, res, key, peak_key=None):
    """fn() timed into res[key]; on CUDA its peak memory into res[peak_key]."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t, out = time.time(), fn()
    if cuda:
        torch.cuda.synchronize()
        res.update({peak_key: torch.cuda.max_memory_allocated() / 2**30} if peak_key else {})
    res[key] = time.time() - t
    return out


def generate_like_sample(model, prompts, n, max_new_tokens, cache="dynamic", temperature=1.0):
    """model.generate() on the same prompts and lengths as sample(): the library's own paths."""
    ids, mask = left_pad(prompts, 0, model.device)
    return model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        num_return_sequences=n,
        cache_implementation=cache,
        do_sample=True,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        pad_token_id=0,
    )


def project(args, theta_star, prompts, res, decoder):
    """The run's hours: --steps steps of this shape, and its evaluations (1265 GSM8K test problems,
    496 of MATH-500) in greedy batches."""
    problems = args.eval_limit or {"math-hard": 496}.get(args.dataset, 1265)
    batch = [prompts[i % len(prompts)] for i in range(min(args.eval_rows or 512, problems))]
    decoder = eager_decoder(decoder, theta_star)  # as evaluate() decodes
    greedy = functools.partial(sample, decoder, batch, 1, args.max_new_tokens, set(), 0, 0)
    timed(greedy, res, "eval_batch_s")
    steps, every = args.steps or {"math-hard": 272}.get(args.dataset, 225), args.eval_every
    evals = steps // every + 1 + (steps % every > 0) if every else 0
    train_h = steps * (res["ours_s"] + res["mstep_s"]) / 3600
    eval_h = evals * -(-problems // len(batch)) * res["eval_batch_s"] / 3600
    return dict(
        eval_rows=len(batch),
        eval_problems=problems,
        projected_train_h=train_h,
        projected_eval_h=eval_h,
        projected_run_h=train_h + eval_h,
    )


if __name__ == "__main__":
    a = parse_args()
    benchmark(a) if a.benchmark else train(a)
