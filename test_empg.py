"""Tests for empg.py: every number is checked against a hand computation or a second implementation.
Run: python -m pytest -q test_empg.py   (CPU, tiny random Qwen2 models; ../shared/data if present, else fixtures/)"""

import json, math, os, shutil, signal, string, subprocess, sys, time
from types import SimpleNamespace

os.environ.setdefault(
    "OMP_NUM_THREADS", "1"
)  # tiny models: threads only oversubscribe a small box,
import pytest  # noqa: E402  (and the CLI subprocesses inherit the setting)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import empg  # noqa: E402

torch.set_num_threads(1)

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(HERE, "..", "shared", "data")
DATA = SHARED if os.path.isdir(SHARED) else os.path.join(HERE, "fixtures", "data")


# ---------------------------------------------------------------- fixtures: a char tokenizer and tiny Qwen2 models
def char_tokenizer(chars=string.printable[:95] + "\n"):
    """Word-level tokenizer, one token per character; pad == eos == <|endoftext|> as in Qwen2.5 base."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {
        "<|endoftext|>": 0,
        "<|im_end|>": 1,
        "[UNK]": 2,
        **{c: i + 3 for i, c in enumerate(chars)},
    }
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")
    t.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=t,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="[UNK]",
        additional_special_tokens=["<|im_end|>"],
    )


def tiny_model(path=None, tok=None, std=0.02, hidden=64, layers=2, seed=0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = tok or char_tokenizer()
    cfg = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        initializer_range=std,
        eos_token_id=0,
        pad_token_id=0,
        bos_token_id=0,
        max_position_embeddings=512,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).eval()
    if path:
        model.save_pretrained(path)
        tok.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tiny"))
    tiny_model(d, std=0.3)
    return d


def run_cli(*argv, script="empg.py"):
    return subprocess.run(
        [sys.executable, os.path.join(HERE, script), *argv],
        capture_output=True,
        text=True,
        cwd=HERE,
        timeout=600,
    )


def sample(model, prompts, n, T, eos, pad, temperature=1.0, generator=None, decoder="static"):
    """empg.sample with a decoder made from the model (or given)."""
    dec = empg.make_decoder(model, decoder) if isinstance(decoder, str) else decoder
    return empg.sample(dec, prompts, n, T, eos, pad, temperature, generator)


def read_jsonl(p):
    return [json.loads(l) for l in open(p)]


# ---------------------------------------------------------------- reward smoothing and advantages
def test_sigmoid_normalize_batch_by_hand():
    # R = [1,0,0,0]: μ = 1/4, unbiased σ² = (9/16 + 3/16)/3 = 1/4, σ = 1/2 → z = [1.5, -0.5, -0.5, -0.5]
    got = empg.sigmoid_normalize(torch.tensor([1.0, 0, 0, 0]))
    s = lambda z: 1 / (1 + math.exp(-z))
    assert torch.allclose(got, torch.tensor([s(1.5), s(-0.5), s(-0.5), s(-0.5)]), atol=1e-6)


def test_sigmoid_normalize_group_none_and_all_equal():
    r = torch.tensor([1.0, 0, 1, 1])
    got = empg.sigmoid_normalize(
        r, "group", 2
    )  # group 1: μ=.5, σ=√.5 → z=±1/√2; group 2 all equal → z=0
    s = 1 / (1 + math.exp(-1 / math.sqrt(2)))
    assert torch.allclose(got, torch.tensor([s, 1 - s, 0.5, 0.5]), atol=1e-6)
    assert torch.equal(empg.sigmoid_normalize(r, "none"), r)
    for same in (torch.ones(8), torch.zeros(8), torch.ones(1)):
        out = empg.sigmoid_normalize(same)
        assert torch.isfinite(out).all() and torch.allclose(out, torch.full_like(same, 0.5))


def test_advantages_by_hand():
    r = torch.tensor([1.0, 0, 0, 0])
    rt = empg.sigmoid_normalize(r)
    assert torch.allclose(empg.advantages(r, 4), 2 * rt - 1)  # author's 2·sigmoid(z) − 1
    assert torch.allclose(empg.advantages(r, 4, baseline="mean"), 2 * (rt - rt.mean()))
    assert torch.allclose(
        empg.advantages(r, 4, reward_norm="none"), torch.tensor([1.0, -1, -1, -1])
    )
    # GRPO, groups of 2: [1,0] → ±(.5/(√.5+1e-6)); [1,1] → 0
    g = empg.advantages(torch.tensor([1.0, 0, 1, 1]), 2, algo="grpo")
    a = 0.5 / (math.sqrt(0.5) + 1e-6)
    assert torch.allclose(g, torch.tensor([a, -a, 0, 0]), atol=1e-6)


# ---------------------------------------------------------------- losses
def test_empg_loss_matches_per_token_loop():
    torch.manual_seed(0)
    logp, adv = torch.randn(3, 5), torch.randn(3)
    mask = torch.tensor([[1.0, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    want = 0.0
    for i in range(3):  # −(1/B) Σ_i (1/|τ_i|) Σ_t A_i log p_it
        toks = [adv[i] * logp[i, t] for t in range(5) if mask[i, t] == 1]
        want -= sum(toks) / len(toks) / 3
    assert torch.allclose(empg.empg_loss(logp, mask, adv), want, atol=1e-6)


def test_grpo_loss_at_ratio_one_equals_empg_gradient():
    torch.manual_seed(0)
    logp = torch.randn(4, 6, requires_grad=True)
    mask, adv = (torch.rand(4, 6) > 0.3).float(), torch.randn(4)
    (g1,) = torch.autograd.grad(empg.grpo_loss(logp, logp.detach(), mask, adv), logp)
    (g2,) = torch.autograd.grad(empg.empg_loss(logp, mask, adv), logp)
    assert torch.allclose(
        empg.grpo_loss(logp, logp.detach(), mask, adv), -adv.mean()
    )  # ρ = 1: value −mean A
    assert torch.allclose(g1, g2)
    # off ratio 1 the clip bites: positive advantage, ratio e^0.5 > 1.2 → clipped, zero gradient
    lp = torch.zeros(1, 1, requires_grad=True)
    (g,) = torch.autograd.grad(
        empg.grpo_loss(lp, torch.full((1, 1), -0.5), torch.ones(1, 1), torch.ones(1)), lp
    )
    assert g.item() == 0 and empg.grpo_loss(
        lp, torch.full((1, 1), -0.5), torch.ones(1, 1), torch.ones(1)
    ).item() == pytest.approx(-1.2)


def test_kl_k3_by_hand():
    assert torch.allclose(
        empg.kl_k3(torch.tensor([-1.0]), torch.tensor([-2.0])), torch.tensor([math.exp(-1) + 1 - 1])
    )
    assert empg.kl_k3(torch.tensor([-3.0]), torch.tensor([-3.0])).item() == 0


# ---------------------------------------------------------------- completion log-probs
def naive_logprobs(model, prompt, comp, temperature=1.0):
    """Second implementation: one unpadded sequence, full logits, fp32 log_softmax."""
    ids = torch.tensor([prompt + comp])
    logits = model(ids).logits[0].float() / temperature
    lp = F.log_softmax(logits, -1)
    return torch.stack([lp[len(prompt) - 1 + t, comp[t]] for t in range(len(comp))])


def test_completion_logprobs_against_full_forward():
    model = tiny_model(std=0.3)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15]]
    comps = [
        [20, 21, 0],
        [22, 23, 24, 25, 26, 0],
        [27, 28],
    ]  # EOS (= pad id 0) ends two; the third is truncated
    for T in (1.0, 0.7):
        ids, attn, cmask = empg.collate(prompts, comps, 0, "cpu")
        logp, _ = empg.completion_logprobs(model, ids, attn, cmask, temperature=T, chunk=4)
        for i, (p, c) in enumerate(zip(prompts, comps)):
            want = naive_logprobs(model, p, c, T)
            assert torch.allclose(logp[i, : len(c)], want, atol=1e-5), (i, T)
            assert (logp[i, len(c) :] == 0).all() and cmask[i].sum() == len(
                c
            )  # padding masked, EOS counted once
        assert (
            cmask[0, 2] == 1 and ids[0, -4].item() == 0
        )  # the EOS token (id == pad id) is trained


def test_left_vs_right_padding_identical():
    model = tiny_model(std=0.3)
    p, c = [5, 6, 7], [8, 9, 0]
    alone, _ = empg.completion_logprobs(model, *empg.collate([p], [c], 0, "cpu"))
    batched, _ = empg.completion_logprobs(
        model, *empg.collate([p, list(range(3, 15))], [c, [1] * 7], 0, "cpu")
    )
    assert torch.allclose(alone[0], batched[0, :3], atol=1e-5)
    # a right-padded prompt gives the *wrong* answer — the trap this design avoids
    ids = torch.tensor([[5, 6, 7, 0, 0, 8, 9, 0]])
    attn = torch.tensor([[1, 1, 1, 0, 0, 1, 1, 1]])
    wrong, _ = empg.completion_logprobs(model, ids, attn, torch.ones(1, 3))
    assert not torch.allclose(alone, wrong, atol=1e-3)


def test_chunked_gradient_equals_naive_gradient():
    model = tiny_model(std=0.3)
    prompts, comps = [[5, 6, 7], [8, 9]], [[10, 11, 12, 0], [13, 14]]
    adv = torch.tensor([0.7, -0.4])
    empg.empg_loss(
        empg.completion_logprobs(model, *empg.collate(prompts, comps, 0, "cpu"), chunk=3)[0],
        empg.collate(prompts, comps, 0, "cpu")[2],
        adv,
    ).backward()
    g1 = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss = -sum(a * naive_logprobs(model, p, c).mean() for a, p, c in zip(adv, prompts, comps)) / 2
    loss.backward()
    for a, p in zip(g1, model.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-5)


@pytest.mark.parametrize("T", [1.0, 0.7])
def test_token_logprob_backward_by_hand_equals_autograd_under_bf16_autocast(T):
    """The hand-written backward, fp32 and under bf16 autocast (the CUDA default; CPU runs it too):
    the same value and gradients as autograd through log_softmax."""
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(7, 16, generator=g), torch.randn(50, 16, generator=g) * 0.3
    y, up = torch.randint(0, 50, (7,), generator=g), torch.randn(7, generator=g)
    for amp in (False, True):
        results = []
        for fn in (
            lambda h, w: empg.TokenLogprob.apply(h, y, w, T),
            lambda h, w: (F.linear(h, w).float() / T).log_softmax(-1).gather(-1, y[:, None])[:, 0],
        ):
            hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                out = fn(hh, ww)
            (out * up).sum().backward()
            results.append([out.detach(), hh.grad, ww.grad])
        got, want = results
        tol = 2e-2 if amp else 1e-5
        assert all(
            torch.allclose(a.float(), b.float(), atol=tol, rtol=tol) for a, b in zip(got, want)
        ), amp


def test_entropy_matches_full_softmax():
    model = tiny_model(std=0.3)
    ids, attn, cmask = empg.collate([[5, 6]], [[7, 8, 9]], 0, "cpu")
    _, ent = empg.completion_logprobs(model, ids, attn, cmask, with_entropy=True)
    logits = model(torch.tensor([[5, 6, 7, 8, 9]])).logits[0, 1:4]
    want = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    assert torch.allclose(ent[0], want, atol=1e-5)


# ---------------------------------------------------------------- the sampler
@pytest.mark.parametrize("mode", ["hf", "static"])
def test_sampler_equals_generate_greedy(mode):
    model = tiny_model(std=0.5)
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    P = max(map(len, prompts))
    ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts])
    attn = (ids != 0).long()
    free = model.generate(
        ids,
        attention_mask=attn,
        max_new_tokens=12,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )[:, P:]
    eos = free[0, 3].item()  # a token greedy decoding emits mid-row, so EOS really stops rows early
    ref = model.generate(
        ids,
        attention_mask=attn,
        max_new_tokens=12,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=eos,
    )[:, P:].tolist()
    want = [r[: r.index(eos) + 1] if eos in r else r for r in ref]
    want = [
        w[: len(w) - next((k for k, x in enumerate(reversed(w)) if x != 0), 0)]
        if eos not in w
        else w
        for w in want
    ]
    got = sample(model, prompts, 3, 12, {eos}, 0, temperature=0, decoder=mode)
    assert any(len(w) < 12 for w in want) and len(set(map(tuple, want))) > 1
    assert got == [w for w in want for _ in range(3)]


def tiny_llama(std=0.5):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=40,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            initializer_range=std,
            eos_token_id=0,
            pad_token_id=0,
            bos_token_id=0,
        )
    ).eval()


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_static_decode_step_matches_model_forward_and_samples_like_hf(arch):
    model = tiny_model(std=0.5, layers=3) if arch == "qwen2" else tiny_llama()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
    g = lambda s: torch.Generator().manual_seed(s)
    # same seed → the same samples from both decode loops, at T = 1 and T = 0.7, with EOS stopping rows
    for T in (1.0, 0.7):
        hf = sample(model, prompts, 4, 40, {9, 20}, 0, T, g(5), decoder="hf")
        assert hf == sample(model, prompts, 4, 40, {9, 20}, 0, T, g(5), decoder="static")
        assert len(set(map(len, hf))) > 1
    # the cache is kept between calls (same addresses for a compiled graph), and a longer call grows it
    dec = empg.StaticDecoder(model)
    sample(model, prompts, 4, 40, {9, 20}, 0, 1.0, g(5), dec)
    kv, valid = dec.kv, dec.valid
    sample(model, [[5]] * 3, 4, 30, {9}, 0, 1.0, g(0), dec)
    assert dec.kv[0][0] is kv[0][0] and dec.valid is valid and valid.shape == (12, 256)
    sample(model, prompts, 4, 300, set(), 0, 1.0, g(0), dec)
    assert dec.valid.shape == (12, 512)
    # and past the first 256 cache columns, where attention starts reading the next block
    long = sample(model, prompts[:2], 1, 300, set(), 0, 1.0, g(6), decoder="hf")
    assert long == sample(model, prompts[:2], 1, 300, set(), 0, 1.0, g(6), decoder="static")
    # one decode step's logits equal the full forward's last-position logits, row by row (left padding included)
    seqs = [
        p + c
        for p, c in zip(
            prompts, sample(model, prompts, 1, 6, set(), 0, 1.0, g(1), decoder="static")
        )
    ]
    for s in seqs:
        want = model(torch.tensor([s])).logits[0, -1]
        dec = empg.StaticDecoder(model)
        dec.allocate(1, len(s) + 1, torch.zeros(1, 2, 1, 16))
        kv, valid = dec.kv, dec.valid.zero_()
        for t, x in enumerate(s):
            logits = empg.decode_step(
                model, kv, valid, torch.tensor([x]), torch.tensor([[t]]), torch.tensor([t]), 256
            )
        assert torch.allclose(logits[0], want, atol=1e-4)


@pytest.mark.skipif(
    not (shutil.which("g++") or shutil.which("c++")),
    reason="torch.compile on CPU needs a C++ compiler",
)
def test_compiled_decoder_has_a_known_bounded_set_of_graphs_and_equals_static(monkeypatch):
    from torch._dynamo.utils import counters

    monkeypatch.setattr(empg, "BLOCK", 8)  # 8-column blocks: a short E-step spans three of them
    model = tiny_model(std=0.5, layers=1)
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    static = lambda ps, n, T: sample(model, ps, n, T, set(), 0, 0, decoder="static")  # noqa: E731
    dec, graphs = (
        empg.StaticDecoder(model, compiled=True),
        lambda: counters["stats"]["unique_graphs"],
    )  # noqa: E731
    before = graphs()
    # 5 prompt + 16 new tokens: a 24-column cache; the decode steps write columns 5..19, so they read
    # windows of 8, 16 and 24 columns: exactly three graphs
    assert sample(model, prompts, 2, 16, set(), 0, 0, decoder=dec) == static(prompts, 2, 16)
    assert graphs() - before == 3 == dec.graph_bound
    # the next E-step (other prompts, same rows, fits the cache) compiles nothing
    other = [[20, 21, 22, 23, 24, 25, 26, 27], [28], [29, 30]]
    assert sample(model, other, 2, 12, set(), 0, 0, decoder=dec) == static(other, 2, 12)
    assert graphs() - before == 3
    # another row count (e.g. eval's last batch) reallocates: its three windows, three graphs more
    assert sample(model, prompts[:2], 2, 16, set(), 0, 0, decoder=dec) == static(prompts[:2], 2, 16)
    assert graphs() - before == 6 == dec.graph_bound <= torch._dynamo.config.recompile_limit
    assert dec.compiled  # never fell back to eager


def test_compiled_sampler_falls_back_when_compilation_fails(monkeypatch, capsys):
    model = tiny_model(std=0.5)
    want = sample(model, [[5, 6, 7], [8]], 2, 10, {7}, 0, 0, decoder="static")

    def broken(fn, **kw):
        def run(*a, **k):
            raise RuntimeError("no compiler here")

        return run

    monkeypatch.setattr(torch, "compile", broken)
    assert sample(model, [[5, 6, 7], [8]], 2, 10, {7}, 0, 0, decoder="compiled") == want
    assert "torch.compile failed (RuntimeError)" in capsys.readouterr().err
    dec = empg.StaticDecoder(model, compiled=True)
    assert sample(model, [[5, 6, 7], [8]], 2, 10, {7}, 0, 0, decoder=dec) == want
    assert dec.compiled is False and dec.fn is empg.decode_step  # later E-steps do not try again
    assert capsys.readouterr().err.count("torch.compile failed") == 1


def test_sampler_reproducible_and_distribution_correct():
    model = tiny_model(std=0.3)
    g = lambda s: torch.Generator().manual_seed(s)
    a = sample(model, [[5, 6], [7]], 4, 6, {0}, 0, 1.0, g(1))
    assert a == sample(model, [[5, 6], [7]], 4, 6, {0}, 0, 1.0, g(1))
    assert a != sample(model, [[5, 6], [7]], 4, 6, {0}, 0, 1.0, g(2))
    # sampling by inversion draws from softmax(logits / T): every token's frequency within 5σ
    for T in (1.0, 0.8):
        logits = torch.randn(1, 500, generator=g(3)) * 3
        toks = empg.next_token(logits.expand(200_000, 500), T, g(4))
        freq, p = torch.bincount(toks, minlength=500) / 200_000, torch.softmax(logits[0] / T, -1)
        assert ((freq - p).abs() <= 5 * (p * (1 - p) / 200_000).sqrt() + 1e-5).all(), T
        assert toks.max() < 500 and freq[p < 1e-6].sum() < 1e-4


# ---------------------------------------------------------------- graders
def test_gsm8k_reward_on_real_rows_and_tricky_strings():
    rows = [json.loads(l) for l in open(os.path.join(DATA, "gsm8k", "test.jsonl"))][:20]
    for r in (
        rows
    ):  # the reference solution grades itself correct; the same with its number changed, wrong
        ans = r["answer"].split("####")[-1].strip()
        assert empg.gsm8k_reward(r["answer"], ans) == 1.0
        assert empg.gsm8k_reward(r["answer"], r["answer"]) == 1.0
        assert (
            empg.gsm8k_reward(
                r["answer"].replace(f"#### {ans}", f"#### {int(ans.replace(',', '')) + 1}"), ans
            )
            == 0
        )
    R = empg.gsm8k_reward
    assert R("so #### 1,234", "1234") == 1 and R("#### -3", "-3") == 1
    assert R("#### 18 and later #### 19", "19") == 0  # the first '####' counts
    assert R("The answer is 18.", "18") == 0  # strict: no '####', no reward
    assert R("#### 18.5", "18") == 0 and R("####", "18") == 0


def test_math_reward_on_real_rows_and_tricky_strings():
    rows = [json.loads(l) for l in open(os.path.join(DATA, "math", "math500_test.jsonl"))][:25]
    for r in rows:
        assert empg.math_reward(r["solution"], r["answer"]) == 1.0, r["unique_id"]
    R = empg.math_reward
    assert (
        R("so \\boxed{\\frac{1}{2}}", "0.5") == 1 and R("\\boxed{\\dfrac12}", "\\frac{1}{2}") == 1
    )
    assert R("\\boxed{3}", "4") == 0 and R("no answer here", "4") == 0
    assert (
        R("#### 12", "12") == 1 and R("it is 7 then 12", "12") == 1
    )  # cascade: boxed → #### → last number
    assert R("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}") == 1


def test_load_problems_local():
    rows, task = empg.load_problems("gsm8k", "train", DATA)
    assert task == "gsm8k" and rows[0]["answer"] == "72" and "Natalia" in rows[0]["question"]
    hard, task = empg.load_problems("math-hard", "train", DATA)
    m500 = {
        json.loads(l)["problem"] for l in open(os.path.join(DATA, "math", "math500_test.jsonl"))
    }
    assert task == "math" and hard and not any(r["question"] in m500 for r in hard)
    if DATA == SHARED:
        assert len(hard) == 8888  # MATH train+test, levels 3-5, minus MATH-500
        assert len(empg.load_problems("math500", "test", DATA)[0]) == 500


# ---------------------------------------------------------------- training: precision, CLI, resume, learning
def m_step_once(model, lr, algo="empg", updates=1):
    args = empg.Args(lr=lr, algo=algo, updates_per_batch=updates, micro_batch_size=2)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    return empg.m_step(
        model,
        opt,
        [[5, 6], [7, 8, 9], [5, 6]],
        [[10, 11, 0], [12], [13, 14]],
        torch.tensor([1.0, -1.0, 0.5]),
        args,
    )


def test_fp32_master_weights_move_at_lr_1e6():
    model = tiny_model(std=0.3)
    before = [p.detach().clone() for p in model.parameters()]
    stats = m_step_once(model, 1e-6)
    moved = [(p - b).abs().max().item() for p, b in zip(model.parameters(), before)]
    assert all(0 < m < 3e-6 for m in moved), moved  # Adam's first step moves each weight by ~lr
    assert stats["grad_norm"] > 0 and stats["step_skipped"] == 0
    # the same update applied to bf16 weights would (almost all) round away: bf16 spacing near 0.3 is ~2e-3
    p, b = list(model.parameters())[1].detach(), before[1]
    w = b.to(torch.bfloat16)
    assert (w + (p - b).to(torch.bfloat16) == w).float().mean() > 0.95


def test_stochastic_rounding_is_unbiased():
    lo = torch.tensor(1.0, dtype=torch.bfloat16)
    hi = torch.nextafter(lo, torch.tensor(2.0, dtype=torch.bfloat16))  # bf16 spacing at 1 is 2^-7
    x = torch.full((200_000,), 1.0 + 0.3 * 2**-7)
    r = empg.stochastic_round(x, torch.Generator().manual_seed(0))
    assert r.dtype == torch.bfloat16 and set(r.unique().tolist()) == {lo.item(), hi.item()}
    assert (r == hi).float().mean().item() == pytest.approx(
        0.3, abs=0.005
    )  # rounds up w.p. the remainder
    assert empg.stochastic_round(-x).float().mean().item() == pytest.approx(-x[0].item(), abs=1e-4)
    exact = (
        torch.tensor([0.5, -3.0, 0.0, 1.5e-5]).to(torch.bfloat16).float()
    )  # bf16 values stay put
    assert torch.equal(empg.stochastic_round(exact).float(), exact)


def test_adamw_sr_is_adamw_and_bf16_updates_at_lr_1e6_accumulate():
    torch.manual_seed(0)
    a = torch.randn(100, 3, requires_grad=True)
    b = a.detach().clone().requires_grad_()
    oa, ob = (
        empg.AdamWSR([a], lr=1e-2, weight_decay=0.1),
        torch.optim.AdamW([b], lr=1e-2, weight_decay=0.1),
    )
    for _ in range(20):  # on fp32 weights it is torch's AdamW
        a.grad, b.grad = (torch.randn(100, 3),) * 2
        oa.step(), ob.step()
    assert torch.allclose(a, b, atol=1e-6)
    # bf16 weights at 0.5 (spacing 2^-8 ≈ 3.9e-3), 1000 Adam steps of lr = 1e-6 each (grad 1 → update = lr):
    # round-to-nearest never moves; stochastic rounding lands on the fp32 answer 0.5 − 1e-3 on average
    w, w_rtn = (
        torch.full((4096,), 0.5, dtype=torch.bfloat16, requires_grad=True) for _ in range(2)
    )
    o, o_rtn = empg.AdamWSR([w], lr=1e-6), torch.optim.AdamW([w_rtn], lr=1e-6, weight_decay=0.0)
    for _ in range(1000):
        w.grad, w_rtn.grad = torch.ones_like(w), torch.ones_like(w_rtn)
        o.step(), o_rtn.step()
    assert torch.all(w_rtn == 0.5)
    assert w.dtype == o.state[w]["exp_avg"].dtype == torch.bfloat16
    assert w.float().mean().item() == pytest.approx(
        0.5 - 1e-3, abs=1.5e-4
    )  # 5σ of the rounding noise


def test_cli_bf16_master_weights_train_save_and_resume_exactly(model_dir, toy_jsonl, tmp_path):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    argv = lambda out, steps, *x: train_argv(
        model_dir,
        out,
        toy_jsonl,
        "--steps",
        steps,
        "--save-every",
        "2",
        "--master-dtype",
        "bf16",
        "--lr",
        "1e-5",
        "--seed",
        "1",  # a seed whose first steps sample a correct answer: non-zero advantages
        *x,
    )
    assert run_cli(*argv(full, "4")).returncode == 0
    assert run_cli(*argv(part, "2")).returncode == 0
    r = run_cli(*argv(part, "4", "--resume"))
    assert r.returncode == 0, r.stderr
    from transformers import AutoModelForCausalLM

    init = AutoModelForCausalLM.from_pretrained(model_dir)
    a, b = (
        AutoModelForCausalLM.from_pretrained(os.path.join(d, "checkpoint-000004"), dtype="auto")
        for d in (full, part)
    )
    assert a.dtype == torch.bfloat16 and all(
        torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters())
    )
    # weights with |w| > 0.1 have a bf16 spacing ≥ 4.9e-4; 4 Adam steps of ~lr = 1e-5 move them by ~4e-5, under half
    # a spacing, so round-to-nearest would leave every one of them where it was. Stochastic rounding moves a share
    # (~ step / spacing) of them by one spacing.
    pairs = [(p.float().flatten(), q.flatten()) for p, q in zip(a.parameters(), init.parameters())]
    big = torch.cat([q.abs() > 0.1 for _, q in pairs])
    moved = torch.cat([p != q.to(torch.bfloat16).float() for p, q in pairs])[big]
    assert 0.003 < moved.float().mean().item() < 0.1
    state = torch.load(
        os.path.join(part, "checkpoint-000004", "trainer_state.pt"), weights_only=False
    )["optimizer"]
    assert {v["exp_avg"].dtype for v in state["state"].values()} == {torch.bfloat16}


def test_micro_batches_by_count_and_by_tokens_give_the_same_step():
    prompts, comps = (
        [[1] * 3, [1] * 2, [1] * 4, [1] * 2, [1]],
        [[2] * 5, [2] * 1, [2] * 2, [2] * 3, [2] * 2],
    )
    # totals 8, 3, 6, 5, 3 → longest first: 0, 2, 3, 1, 4
    assert empg.micro_batches(prompts, comps, 2) == [[0, 2], [3, 1], [4]]
    # budget 12: [0, 2] would pad to 2×(4+5) = 18; [2, 3] to 2×(4+3) = 14; [3, 1] is 2×(2+3) = 10; [3, 1, 4] 3×5 = 15
    assert empg.micro_batches(prompts, comps, 2, tokens=12) == [[0], [2], [3, 1], [4]]
    assert empg.micro_batches(prompts, comps, 2, tokens=100) == [[0, 2, 3, 1, 4]]
    assert empg.micro_batches(prompts, comps, 2, tokens=1) == [
        [0],
        [2],
        [3],
        [1],
        [4],
    ]  # one sequence always fits
    weights = []
    for kw in (dict(micro_batch_size=1), dict(micro_batch_size=5), dict(micro_batch_tokens=12)):
        model = tiny_model(std=0.3)
        args = empg.Args(lr=1.0, **kw)
        empg.m_step(
            model,
            torch.optim.SGD(model.parameters(), lr=1.0),
            [[p[0] + 4] * len(p) for p in prompts],
            [[c[0] + 8 + k for k in range(len(c))] for c in comps],
            torch.tensor([1.0, -1.0, 0.5, 2.0, -0.3]),
            args,
        )
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    init = torch.cat([p.detach().flatten() for p in tiny_model(std=0.3).parameters()])
    assert (
        weights[0] - init
    ).abs().max() > 1e-3  # SGD at lr 1: weights − init = −(clipped) gradient
    for w in weights[1:]:
        assert torch.allclose(w, weights[0], atol=1e-6)


def test_grpo_first_update_equals_empg_and_multiple_updates_run():
    a, b = tiny_model(std=0.3), tiny_model(std=0.3)
    m_step_once(a, 1e-3, "empg"), m_step_once(b, 1e-3, "grpo")
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-7)
    stats = m_step_once(tiny_model(std=0.3), 1e-2, "grpo", updates=3)
    assert 0 <= stats["clip_frac"] <= 1


def train_argv(model_dir, out, data, *extra):
    return [
        "--model",
        model_dir,
        "--dataset",
        data,
        "--output-dir",
        out,
        "--prompts-per-step",
        "2",
        "--num-samples",
        "3",
        "--max-new-tokens",
        "6",
        "--micro-batch-size",
        "4",
        "--lr",
        "1e-3",
        *extra,
    ]


@pytest.fixture(scope="module")
def toy_jsonl(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "toy.jsonl"
    p.write_text(
        "".join(json.dumps({"question": f"{d}", "answer": f"{d}"}) + "\n" for d in range(10))
    )
    return str(p)


def test_cli_writes_metrics_checkpoints_and_resumes_exactly(model_dir, toy_jsonl, tmp_path):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    r = run_cli(*train_argv(model_dir, full, toy_jsonl, "--steps", "4", "--save-every", "2"))
    assert r.returncode == 0, r.stderr
    m = read_jsonl(os.path.join(full, "metrics.jsonl"))
    keys = {
        "step",
        "reward_mean",
        "loss",
        "response_len_mean",
        "truncated_frac",
        "grad_norm",
        "estep_s",
        "mstep_s",
        "estep_tok_s",
        "lr",
    }
    assert [x["step"] for x in m] == [1, 2, 3, 4] and keys <= set(m[0])
    assert sorted(os.listdir(full)) == [
        ".lock",
        "args.json",
        "checkpoint-000002",
        "checkpoint-000004",
        "curves.png",
        "metrics.jsonl",
        "samples.jsonl",
        "summary.json",
    ]
    assert os.path.exists(os.path.join(full, "checkpoint-000004", "trainer_state.pt"))
    assert not os.path.exists(os.path.join(full, "checkpoint-000002", "trainer_state.pt"))
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(os.path.join(full, "checkpoint-000004"))
    # interrupted run: 2 steps, then --resume to 4 → same metrics and weights as the uninterrupted run
    assert (
        run_cli(
            *train_argv(model_dir, part, toy_jsonl, "--steps", "2", "--save-every", "2")
        ).returncode
        == 0
    )
    r = run_cli(
        *train_argv(model_dir, part, toy_jsonl, "--steps", "4", "--save-every", "2", "--resume")
    )
    assert r.returncode == 0, r.stderr
    m2 = read_jsonl(os.path.join(part, "metrics.jsonl"))
    drop = ("estep_s", "mstep_s", "estep_tok_s", "mstep_tok_s")
    assert [{k: v for k, v in x.items() if k not in drop} for x in m] == [
        {k: v for k, v in x.items() if k not in drop} for x in m2
    ]
    a = AutoModelForCausalLM.from_pretrained(os.path.join(full, "checkpoint-000004"), dtype="auto")
    b = AutoModelForCausalLM.from_pretrained(os.path.join(part, "checkpoint-000004"), dtype="auto")
    assert a.dtype == torch.bfloat16 and all(
        torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters())
    )
    # the fp32 master weights (trainer_state.pt) are bit-identical too, and round to the bf16 files
    sa, sb = (
        torch.load(os.path.join(d, "checkpoint-000004", "trainer_state.pt"), weights_only=False)[
            "master"
        ]
        for d in (full, part)
    )
    assert sa.keys() == sb.keys() and all(
        torch.equal(sa[k], sb[k]) and sa[k].dtype == torch.float32 for k in sa
    )
    assert torch.equal(
        sa["model.norm.weight"].to(torch.bfloat16), dict(a.named_parameters())["model.norm.weight"]
    )


@pytest.mark.parametrize("algo", ["empg", "grpo"])
def test_reward_rises_on_toy_copy_task(algo, tmp_path, toy_jsonl):
    """Prompt 'd=' → reward 1 iff the completion's last number is d. A random char model starts near 0."""
    d = str(tmp_path / "m")
    tiny_model(d, std=0.02)
    args = empg.parse_args(
        train_argv(
            d,
            str(tmp_path / "o"),
            toy_jsonl,
            "--steps",
            "60",
            "--prompts-per-step",
            "8",
            "--num-samples",
            "8",
            "--max-new-tokens",
            "2",
            "--lr",
            "3e-3",
            "--prompt-template",
            "{question}=",
            "--save-every",
            "100",
            "--algo",
            algo,
        )
    )
    out = empg.train(args)
    r = [x["reward_mean"] for x in read_jsonl(os.path.join(out, "metrics.jsonl"))]
    first, last = sum(r[:10]) / 10, sum(r[-10:]) / 10  # seen: ~0.02 → ~0.3-0.4
    assert last > first + 0.15, (first, last)


# ---------------------------------------------------------------- bad input: one line, exit 2, no traceback
def bad(argv, capsys):
    with pytest.raises(SystemExit) as e:
        empg.train(empg.parse_args(argv))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_bad_inputs(model_dir, toy_jsonl, tmp_path, capsys):
    out = str(tmp_path / "o")
    assert "cannot load model" in bad(train_argv(str(tmp_path / "nope"), out, toy_jsonl), capsys)
    assert "cannot read" in bad(train_argv(model_dir, out, str(tmp_path / "missing.jsonl")), capsys)
    (tmp_path / "bad.jsonl").write_text('{"question": "1", "answer": "1"}\n{oops\n')
    assert "bad.jsonl:2" in bad(train_argv(model_dir, out, str(tmp_path / "bad.jsonl")), capsys)
    (tmp_path / "empty.jsonl").write_text("\n")
    assert "no rows" in bad(train_argv(model_dir, out, str(tmp_path / "empty.jsonl")), capsys)
    (tmp_path / "noq.jsonl").write_text('{"text": "1", "answer": "1"}\n')
    assert "question" in bad(train_argv(model_dir, out, str(tmp_path / "noq.jsonl")), capsys)
    assert "unknown dataset" in bad(train_argv(model_dir, out, "imagenet"), capsys)
    assert "num-samples >= 2" in bad(
        train_argv(model_dir, out, toy_jsonl, "--num-samples", "1", "--reward-norm", "group"),
        capsys,
    )
    assert "no checkpoint" in bad(train_argv(model_dir, out, toy_jsonl, "--resume"), capsys)
    assert "--steps" in bad(train_argv(model_dir, out, toy_jsonl, "--steps", "0"), capsys)
    if not torch.cpu._is_avx512_bf16_supported():
        assert "bf16" in bad(
            train_argv(model_dir, out, toy_jsonl, "--dtype", "bf16", "--device", "cpu"), capsys
        )
    assert "computes in bf16" in bad(
        train_argv(model_dir, out, toy_jsonl, "--master-dtype", "bf16", "--dtype", "fp32"), capsys
    )


def test_bad_model_path_from_the_shell(toy_jsonl, tmp_path):
    r = run_cli(
        "--model",
        str(tmp_path / "nope"),
        "--dataset",
        toy_jsonl,
        "--output-dir",
        str(tmp_path / "o"),
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr and "cannot load model" in r.stderr


# ---------------------------------------------------------------- many processes: torchrun + FSDP2 on CPU (gloo)
TORCHRUN = [
    sys.executable,
    "-m",
    "torch.distributed.run",
    "--standalone",
    "--nproc-per-node",
    "2",
]  # a free port each
FIXED = dict(
    prompts=[[5, 6], [7, 8, 9], [5, 6], [10, 11, 12, 13]],
    comps=[[10, 11, 0], [12], [13, 14], [15, 16, 17, 0]],
    rewards=[1.0, 0.0, 0.0, 0.0],
)
SHARDED_STEP = """
import contextlib, json, sys, torch
sys.path.insert(0, {here!r})
import empg
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from transformers import AutoModelForCausalLM
fixed, args = json.loads({fixed!r}), empg.Args(**json.loads({args!r}))
rank, world = empg.init_distributed(args)
sl = slice(rank * 2, rank * 2 + 2)
rewards = torch.tensor(empg.gather_all(fixed["rewards"][sl]))  # each process graded only its own samples
adv = empg.advantages(rewards, 2)
model = AutoModelForCausalLM.from_pretrained({model!r})
empg.shard(model, torch.float32)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
empg.m_step(model, opt, fixed["prompts"][sl], fixed["comps"][sl], adv[sl], args)
sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
if rank == 0:
    torch.save(dict(sd=sd, adv=adv), {out!r})
torch.distributed.barrier()
torch.distributed.destroy_process_group()  # exiting with a live gloo group can abort the process
import os
os._exit(0)  # and gloo's threads can still abort at interpreter teardown ("terminate called ...")
"""


@pytest.mark.parametrize("tokens", [0, 12])
def test_torchrun_fsdp2_step_equals_one_process(model_dir, tmp_path, tokens):
    """tokens = 12: --micro-batch-tokens gives rank 0 one micro-batch (2 × (3 + 3) = 12 padded tokens) and
    rank 1 two (2 × (4 + 4) = 16 > 12): unpaired FSDP2 collectives hung here; now both run two."""
    from transformers import AutoModelForCausalLM

    kw = dict(lr=1e-3, micro_batch_size=1, micro_batch_tokens=tokens, device="cpu", grad_clip=0.5)
    script, out = tmp_path / "step.py", str(tmp_path / "two.pt")
    script.write_text(
        SHARDED_STEP.format(
            here=HERE, fixed=json.dumps(FIXED), model=model_dir, out=out, args=json.dumps(kw)
        )
    )
    r = subprocess.run([*TORCHRUN, str(script)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    two = torch.load(out, weights_only=False)
    # one process, all four samples
    args = empg.Args(lr=1e-3, micro_batch_size=1, device="cpu", grad_clip=0.5)
    adv = empg.advantages(torch.tensor(FIXED["rewards"]), 2)
    assert torch.allclose(
        two["adv"], adv
    )  # (b) batch reward normalization over all processes' rewards
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    stats = empg.m_step(model, opt, FIXED["prompts"], FIXED["comps"], adv, args)
    if tokens:
        assert empg.micro_batches(FIXED["prompts"][:2], FIXED["comps"][:2], 1, tokens) == [[0, 1]]
        assert empg.micro_batches(FIXED["prompts"][2:], FIXED["comps"][2:], 1, tokens) == [[1], [0]]
    assert stats["grad_norm"] > 0.5  # the clip is active, so the global grad norm must be right too
    moved = 0
    for name, p in model.state_dict().items():  # (a) the weights after the step agree
        assert torch.allclose(p, two["sd"][name], atol=1e-6), name
        moved += not torch.equal(
            p, AutoModelForCausalLM.from_pretrained(model_dir).state_dict()[name]
        )
    assert moved > 10


def test_torchrun_cli_writes_once_and_resumes_with_one_process(model_dir, toy_jsonl, tmp_path):
    out = str(tmp_path / "o")
    r = subprocess.run(
        [
            *TORCHRUN,
            os.path.join(HERE, "empg.py"),
            *train_argv(model_dir, out, toy_jsonl, "--steps", "2", "--save-every", "1"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=HERE,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    m = read_jsonl(os.path.join(out, "metrics.jsonl"))
    assert [x["step"] for x in m] == [1, 2]  # (c) one log, not one per process
    assert (
        len(read_jsonl(os.path.join(out, "samples.jsonl"))) == 2 * 3
    )  # rank 0 logs from its own 3 completions
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(os.path.join(out, "checkpoint-000002"))
    r = run_cli(
        *train_argv(model_dir, out, toy_jsonl, "--steps", "3", "--resume")
    )  # (d) resume with G = 1
    assert r.returncode == 0, r.stderr
    assert [x["step"] for x in read_jsonl(os.path.join(out, "metrics.jsonl"))] == [1, 2, 3]
    # a bad launch: 3 prompts cannot be split over 2 processes
    r = subprocess.run(
        [
            *TORCHRUN,
            os.path.join(HERE, "empg.py"),
            *train_argv(model_dir, out, toy_jsonl, "--prompts-per-step", "3"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=HERE,
    )
    assert (
        r.returncode != 0
        and r.stderr.count("empg: error: --prompts-per-step 3 is not divisible") == 1
    )


# ---------------------------------------------------------------- the walkthrough never rots
@pytest.mark.parametrize(
    "nb", sorted(f for f in os.listdir(os.path.join(HERE, "notebooks")) if f.endswith(".ipynb"))
)
def test_notebook_executes(nb, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    spec = (
        tmp_path / "kernels" / "empg-test"
    )  # a kernel on this very interpreter, whatever kernels are installed
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "empg",
                "language": "python",
            }
        )
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    book = nbformat.read(os.path.join(HERE, "notebooks", nb), as_version=4)
    NotebookClient(
        book,
        timeout=600,
        kernel_name="empg-test",
        resources={"metadata": {"path": os.path.join(HERE, "notebooks")}},
    ).execute()  # raises on a cell error
    out = "".join(o.get("text", "") for c in book.cells if c.cell_type == "code" for o in c.outputs)
    assert "by hand:" in out and "last 10 steps" in out


def test_benchmark_prints_its_json_line(model_dir):
    r = run_cli(
        "--benchmark",
        "--model",
        model_dir,
        "--prompts-per-step",
        "2",
        "--num-samples",
        "2",
        "--max-new-tokens",
        "8",
    )
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["device"] == "cpu" and res["prompts"] == 2 and res["max_new_tokens"] == 8
    for k in ("ours_tok_s", "generate_dynamic_tok_s", "generate_static_tok_s", "mstep_tok_s"):
        assert res[k] > 0
    for cache in ("dynamic", "static"):  # both of transformers' generate() paths, same work
        assert res[f"speedup_vs_{cache}"] == pytest.approx(
            res[f"generate_{cache}_s"] / res["ours_s"]
        )
    assert res["projected_run_h"] == pytest.approx(
        res["projected_train_h"] + res["projected_eval_h"]
    )
    assert res["projected_eval_h"] > 0 and res["eval_rows"] == 512  # one batch of 512 rows


# ---------------------------------------------------------------- the paper's protocol (issue: reproduce the paper)
def test_authors_strict_gsm8k_rule_boundaries():
    R = empg.gsm8k_reward
    assert R("#### 18.", "18") == 0 and R("####18", "18") == 0 and R("#### $18", "18") == 0
    assert (
        R("#### 1,234", "1234") == 1
        and R("#### 1,234", "#### 1,234") == 1
        and R("#### -5", "-5") == 1
    )
    assert (
        R("#### 18 then #### 19", "18") == 1 and R("#### 18 then #### 19", "19") == 0
    )  # first match wins
    assert (
        R("#### 18\nWait, #### 19.", "19") == 0 and empg.hash_answer("####  7") is None
    )  # exactly one space
    g = empg.grade("so #### $18", "18", "gsm8k")
    assert not g["correct"] and g["lenient"]  # the loose rule is eval.py's lenient score only


def test_every_gsm8k_test_solution_grades_itself_correct():
    rows = [json.loads(l) for l in open(os.path.join(DATA, "gsm8k", "test.jsonl"))]
    assert all(empg.gsm8k_reward(r["answer"], r["answer"]) == 1.0 for r in rows)
    assert all(empg.gsm8k_reward(r["answer"], empg.final_answer(r["answer"])) == 1.0 for r in rows)


def test_prompt_filter_counts():
    rows = [{"question": "x" * n, "answer": "1"} for n in (1, 10, 11, 50)]
    t = "Q: {question}"  # 3 characters + the question
    assert [len(r["question"]) for r in empg.keep_short(rows, t, 13)] == [1, 10]
    assert len(empg.keep_short(rows, t, 0)) == 4  # 0: no filter
    if DATA != SHARED:
        pytest.skip("the author's counts need ../shared/data")
    count = lambda ds, split, preset: len(
        empg.keep_short(
            empg.load_problems(ds, split, DATA)[0],
            empg.default_template(ds, empg.load_problems(ds, split, DATA)[1]),
            empg.PRESETS[preset]["max_prompt_chars"],
        )
    )
    assert (
        count("gsm8k", "train", "gsm8k") == 7230 and 7230 // 32 == 225
    )  # the x-axis of the paper's figures
    assert count("gsm8k", "test", "gsm8k") == 1265 and count("math500", "test", "math-hard") == 496


def test_presets_and_their_overrides():
    a = empg.parse_args(["--dataset", "gsm8k"])
    assert (a.num_samples, a.max_new_tokens, a.max_prompt_chars, a.reward_norm) == (
        2,
        1024,
        512,
        "token",
    )
    a = empg.parse_args(["--dataset", "math-hard", "--max-new-tokens", "2048"])
    assert (a.num_samples, a.max_new_tokens, a.max_prompt_chars) == (8, 2048, 1024)
    a = empg.parse_args(["--dataset", "x.jsonl", "--num-samples", "3"])
    assert (a.num_samples, a.max_new_tokens, a.max_prompt_chars, a.steps) == (3, 1024, 0, None)


def test_token_weighted_statistics_by_hand():
    r, lens = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([3, 1, 1])
    # token: 5 tokens carry rewards [1,1,1,0,0] → μ = 0.6, unbiased σ² = (3·0.16 + 2·0.36)/4 = 0.3
    z = torch.tensor([0.4, -0.6, -0.6]) / math.sqrt(0.3 + 1e-8)
    assert torch.allclose(empg.sigmoid_normalize(r, "token", lengths=lens), torch.sigmoid(z))
    # batch (per response): μ = 1/3, σ² = 1/3 → a different z for the same rewards
    zb = torch.tensor([2 / 3, -1 / 3, -1 / 3]) / math.sqrt(1 / 3 + 1e-8)
    assert torch.allclose(empg.sigmoid_normalize(r, "batch"), torch.sigmoid(zb))
    assert not torch.allclose(torch.sigmoid(z), torch.sigmoid(zb), atol=0.02)
    assert torch.allclose(
        empg.advantages(r, 3, reward_norm="token", lengths=lens), 2 * torch.sigmoid(z) - 1
    )
    assert torch.allclose(
        empg.sigmoid_normalize(r, "token"), torch.sigmoid(zb)
    )  # no lengths: per response
    same = empg.sigmoid_normalize(torch.ones(4), "token", lengths=torch.tensor([1, 2, 3, 4]))
    assert torch.equal(same, torch.full((4,), 0.5))  # all equal: z = 0, not NaN


def test_kl_k3_is_clamped_like_the_authors():
    logp = torch.tensor([0.0, 0.0, 0.0])
    ref = torch.tensor([-1.0, 3.0, 30.0])
    want = [
        math.exp(-1) + 1 - 1,
        min(math.exp(3) - 3 - 1, 10),
        10.0,
    ]  # e^3 − 4 = 16.1 → 10; r = 30 → 20 → 10
    assert torch.allclose(empg.kl_k3(logp, ref), torch.tensor(want))


def test_cli_evaluates_during_the_run_and_resumes_the_eval_log(model_dir, toy_jsonl, tmp_path):
    out = str(tmp_path / "o")
    argv = lambda steps, *x: train_argv(
        model_dir,
        out,
        toy_jsonl,
        "--steps",
        steps,
        "--save-every",
        "2",
        "--eval-every",
        "2",
        "--eval-limit",
        "4",
        "--eval-dataset",
        toy_jsonl,
        *x,
    )
    r = run_cli(*argv("3"))  # evaluations at steps 0, 2 and the end (3)
    assert r.returncode == 0, r.stderr
    r = run_cli(
        *argv("4", "--resume")
    )  # resumes from checkpoint 2: step 2's evaluation is not repeated
    assert r.returncode == 0, r.stderr
    ev = read_jsonl(os.path.join(out, "eval.jsonl"))
    assert [e["step"] for e in ev] == [0, 2, 4] and all(
        e["n"] == 4 and 0 <= e["test_score"] <= 1 for e in ev
    )
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["test_score_last10"] == pytest.approx(sum(e["test_score"] for e in ev) / 3)
    assert summary["step0_test_score"] == ev[0]["test_score"]
    assert f"test score (mean of the last 10 evals) {summary['test_score_last10']:.3f}" in r.stderr


# ---------------------------------------------------------------- the main command's path (issue: the GPU run)
def test_a_1b_model_on_a_cpu_needs_an_explicit_device_cpu(tmp_path, toy_jsonl, capsys):
    from transformers import Qwen2Config

    d = str(
        tmp_path / "qwen1.5b"
    )  # Qwen2.5-1.5B's shape, config only: counted on the meta device, never built
    Qwen2Config(
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ).save_pretrained(d)
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    err = bad(["--model", d, "--dataset", toy_jsonl, "--output-dir", str(tmp_path / "o")], capsys)
    assert "no CUDA GPU: a 1.5B model on a CPU takes days; pass --device cpu to insist" in err


def test_frozen_copy_is_the_policy_in_bf16_without_a_full_fp32_copy():
    policy = tiny_model(std=0.3)
    twin = empg.frozen_copy(policy, torch.bfloat16)
    assert twin.dtype == torch.bfloat16 and not any(p.requires_grad for p in twin.parameters())
    for (k, p), (k2, q) in zip(policy.named_parameters(), twin.named_parameters()):
        assert k == k2 and torch.equal(p.to(torch.bfloat16), q)
    assert twin.lm_head.weight is twin.model.embed_tokens.weight  # still tied
    with torch.no_grad():  # and it is θ*: the same policy, rounded
        policy.model.norm.weight.add_(1.0)
        empg.sync_theta_star(twin, policy)
    assert torch.equal(twin.model.norm.weight, policy.model.norm.weight.to(torch.bfloat16))


# ---------------------------------------------------------------- nothing lost, nothing silent (issue: careful user)
def weights(d):
    from transformers import AutoModelForCausalLM

    return (
        torch.load(os.path.join(d, "trainer_state.pt"), weights_only=False)["master"]
        if os.path.exists(os.path.join(d, "trainer_state.pt"))
        else AutoModelForCausalLM.from_pretrained(d).state_dict()
    )


def test_a_run_dir_holds_one_run(model_dir, toy_jsonl, tmp_path, capsys):
    out = str(tmp_path / "o")
    empg.train(empg.parse_args(train_argv(model_dir, out, toy_jsonl, "--steps", "2")))
    rows, _ = read_jsonl(os.path.join(out, "metrics.jsonl")), capsys.readouterr()
    err = bad(
        train_argv(model_dir, out, toy_jsonl, "--steps", "2"), capsys
    )  # a fresh run into it: refused
    assert "already holds a run: --resume continues it, --overwrite replaces it" in err
    assert read_jsonl(os.path.join(out, "metrics.jsonl")) == rows and os.path.exists(
        os.path.join(out, "checkpoint-000002", "trainer_state.pt")
    )  # nothing was touched
    for flag, value in [
        ("--lr", "1e-2"),
        ("--seed", "1"),
        ("--num-samples", "2"),
        ("--algo", "grpo"),
        ("--model", str(tmp_path)),
        ("--dataset", os.path.join(DATA, "gsm8k", "test.jsonl")),
    ]:
        argv = train_argv(model_dir, out, toy_jsonl, "--steps", "3", "--resume")
        argv = [value if i and argv[i - 1] == flag else x for i, x in enumerate(argv)]
        argv += [] if flag in argv else [flag, value]
        assert f"--resume: {flag} is" in bad(argv, capsys)  # names the flag, changes nothing
    assert json.load(open(os.path.join(out, "args.json")))["lr"] == 1e-3
    # the flags RESUMABLE lists may change: --steps continues the run
    empg.train(empg.parse_args(train_argv(model_dir, out, toy_jsonl, "--steps", "3", "--resume")))
    assert [m["step"] for m in read_jsonl(os.path.join(out, "metrics.jsonl"))] == [1, 2, 3]
    empg.train(
        empg.parse_args(train_argv(model_dir, out, toy_jsonl, "--steps", "1", "--overwrite"))
    )
    assert [m["step"] for m in read_jsonl(os.path.join(out, "metrics.jsonl"))] == [1]
    assert sorted(d for d in os.listdir(out) if d.startswith("checkpoint")) == ["checkpoint-000001"]


def test_a_second_trainer_on_the_same_dir_is_refused(model_dir, toy_jsonl, tmp_path):
    out = str(tmp_path / "o")
    first = subprocess.Popen(
        [
            sys.executable,
            os.path.join(HERE, "empg.py"),
            *train_argv(model_dir, out, toy_jsonl, "--steps", "400", "--save-every", "1000"),
        ],
        stderr=subprocess.PIPE,
        text=True,
        cwd=HERE,
    )
    try:
        for _ in range(600):  # until the first one has its lock and has started stepping
            if os.path.exists(os.path.join(out, "metrics.jsonl")):
                break
            time.sleep(0.1)
        r = run_cli(*train_argv(model_dir, out, toy_jsonl, "--steps", "2", "--resume"))
        assert r.returncode == 2 and r.stderr.strip().endswith(f"(it holds {out}/.lock)"), r.stderr
        assert "another trainer is running" in r.stderr
    finally:
        first.kill()
        first.wait()
    # once it is gone, its lock is too (a checkpoint is needed to resume: start afresh instead)
    r = run_cli(*train_argv(model_dir, out, toy_jsonl, "--steps", "1", "--overwrite"))
    assert r.returncode == 0, r.stderr


def test_ctrl_c_finishes_the_step_saves_it_and_resume_is_exact(model_dir, toy_jsonl, tmp_path):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    argv = lambda out, *x: train_argv(
        model_dir, out, toy_jsonl, "--steps", "6", "--save-every", "100", *x
    )
    assert run_cli(*argv(full)).returncode == 0
    p = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "empg.py"), *argv(part)],
        stderr=subprocess.PIPE,
        text=True,
        cwd=HERE,
    )
    for _ in range(600):
        if os.path.exists(os.path.join(part, "metrics.jsonl")) and read_jsonl(
            os.path.join(part, "metrics.jsonl")
        ):
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    err = p.communicate(timeout=120)[1]
    assert p.returncode == 130, err
    saved = int(
        err.split("step ")[-1].split(" is saved")[0]
    )  # "interrupted; step N is saved in ..."
    assert 1 <= saved < 6 and os.listdir(part).count(f"checkpoint-{saved:06d}") == 1
    assert [m["step"] for m in read_jsonl(os.path.join(part, "metrics.jsonl"))] == list(
        range(1, saved + 1)
    )
    r = run_cli(*argv(part, "--resume"))
    assert r.returncode == 0, r.stderr
    a, b = (
        weights(os.path.join(full, "checkpoint-000006")),
        weights(os.path.join(part, "checkpoint-000006")),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_save_interrupted_by_ctrl_c_is_whole_and_names_its_step(
    model_dir, toy_jsonl, tmp_path, monkeypatch
):
    out = str(tmp_path / "o")
    from transformers import AutoModelForCausalLM

    args = empg.parse_args(train_argv(model_dir, out, toy_jsonl, "--steps", "2"))
    out_dir, lock, _ = empg.open_run_dir(args, 0)
    policy = AutoModelForCausalLM.from_pretrained(model_dir)
    run = SimpleNamespace(args=args, out_dir=out_dir, rank=0, policy=policy, tok=char_tokenizer(),
                          opt=torch.optim.AdamW(policy.parameters()), fit={})  # fmt: skip
    empg.write_atomic(os.path.join(out, "args.json"), "{}")
    real = empg.write_checkpoint

    def interrupted(path, *a):
        os.kill(
            os.getpid(), signal.SIGINT
        )  # Ctrl-C (Python's default: KeyboardInterrupt) in the middle of a save
        time.sleep(0.2)
        real(path, *a)

    monkeypatch.setattr(empg, "write_checkpoint", interrupted)
    with pytest.raises(KeyboardInterrupt):  # held off until the checkpoint is renamed into place
        empg.save_checkpoint(run, 1)
    assert sorted(os.listdir(out)) == [
        ".lock",
        "args.json",
        "checkpoint-000001",
    ]  # no .tmp-checkpoint left
    w = weights(os.path.join(out, "checkpoint-000001"))
    assert all(torch.equal(w[k], v) for k, v in run.policy.state_dict().items())

    # a full disk: one line, the temp dir removed, the earlier checkpoint intact
    def full_disk(path, *a):
        os.makedirs(path)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(empg, "write_checkpoint", full_disk)
    with pytest.raises(SystemExit):
        empg.save_checkpoint(run, 2)
    assert sorted(os.listdir(out)) == [".lock", "args.json", "checkpoint-000001"]


def test_torn_log_lines_are_dropped_on_resume(model_dir, toy_jsonl, tmp_path, capsys):
    out = str(tmp_path / "o")
    empg.train(empg.parse_args(train_argv(model_dir, out, toy_jsonl, "--steps", "2")))
    capsys.readouterr()
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write('{"step": 3, "reward_me')  # a full disk (or a kill) mid-row
    empg.train(empg.parse_args(train_argv(model_dir, out, toy_jsonl, "--steps", "3", "--resume")))
    assert "dropped 1 torn line(s)" in capsys.readouterr().err
    assert [m["step"] for m in read_jsonl(os.path.join(out, "metrics.jsonl"))] == [1, 2, 3]


def test_every_bad_number_and_input_is_one_line(model_dir, toy_jsonl, tmp_path, capsys):
    out = str(tmp_path / "o")
    for flags, says in [
        (["--lr", "inf"], "--lr must be in [0, 1)"),
        (["--lr", "1e30"], "--lr"),
        (["--weight-decay", "inf"], "--weight-decay must be in [0, 1)"),
        (["--weight-decay", "nan"], "--weight-decay must be in"),
        (["--weight-decay", "-1"], "--weight-decay"),
        (["--beta", "inf"], "--beta"),
        (["--entropy-coef", "-1"], "--entropy-coef must be in [0, inf)"),
        (["--seed", "1e23"], "--seed"),
        (["--seed", str(2**40)], "--seed"),
        (["--device", "tpu"], "--device"),
        (["--prompt-template", "no placeholder"], "{question}"),
        (["--temperature", "nan"], "--temperature must be in (0, 10]"),
    ]:
        with pytest.raises(SystemExit) as e:
            empg.parse_args(train_argv(model_dir, out, toy_jsonl, *flags))
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and says in err, (flags, err)

    def data(name, *rows):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(tmp_path / name)

    ok = {"question": "1", "answer": "1"}
    assert "e.jsonl:2: needs a non-empty 'question'" in bad(
        train_argv(model_dir, out, data("e.jsonl", ok, {"question": "", "answer": "1"})), capsys
    )
    for answer in (None, float("nan"), [4, 5], True, " "):
        assert "a.jsonl:3: 'answer' must be a non-empty string or a number" in bad(
            train_argv(
                model_dir, out, data("a.jsonl", ok, ok, {"question": "2", "answer": answer})
            ),
            capsys,
        )
    assert "exceeds the model's context (512)" in bad(
        train_argv(model_dir, out, data("long.jsonl", ok, {"question": "x" * 600, "answer": "1"})),
        capsys,
    )
    small = str(tmp_path / "small")  # a model whose vocabulary is smaller than its tokenizer's
    from transformers import Qwen2Config, Qwen2ForCausalLM

    Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=50,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    ).save_pretrained(small)
    char_tokenizer().save_pretrained(small)
    assert "beyond the model's vocabulary (50): wrong --tokenizer?" in bad(
        train_argv(small, out, data("t.jsonl", {"question": "~~~", "answer": "1"})), capsys
    )
    assert "cannot load tokenizer" in bad(
        train_argv(model_dir, out, toy_jsonl, "--tokenizer", str(tmp_path / "no-such-tokenizer")),
        capsys,
    )
    (tmp_path / "file").write_text("x")
    assert "is a file, not a directory" in bad(
        train_argv(model_dir, str(tmp_path / "file"), toy_jsonl), capsys
    )
    assert "cannot write to --output-dir" in bad(
        train_argv(model_dir, str(tmp_path / "file" / "o"), toy_jsonl), capsys
    )
    nan = str(
        tmp_path / "nan"
    )  # NaN weights: every step is skipped, so the run stops instead of "finishing"
    m = tiny_model(std=0.3)
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(float("nan"))
    m.save_pretrained(nan)
    char_tokenizer().save_pretrained(nan)
    with pytest.raises(SystemExit) as e:  # (after the progress bar: the last line)
        empg.train(
            empg.parse_args(train_argv(nan, str(tmp_path / "n"), toy_jsonl, "--steps", "10"))
        )
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and err.startswith(
        "empg: error: 3 steps in a row had a non-finite loss"
    )
    assert "stopped at step 3" in err


def test_an_unreachable_hub_is_one_warning_and_one_error_at_once(tmp_path, toy_jsonl):
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        pytest.skip("the hub is reachable from here")
    except OSError:
        pass
    r = run_cli(
        "--model", "Qwen/Qwen2.5-1.5B", "--dataset", toy_jsonl, "--output-dir", str(tmp_path / "o")
    )
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert (
        lines[-2]
        == "empg: warning: the Hugging Face hub is unreachable; using the local cache only"
    )
    assert lines[-1].startswith("empg: error: cannot load model 'Qwen/Qwen2.5-1.5B'")
    assert lines[-1].endswith("the hub is unreachable: pass a local dir")


def test_the_in_run_score_is_eval_py_score(tmp_path):
    """The toy of the README's quick start learns to a non-zero greedy score; eval.py on the same fp32
    weights (the final master weights) gives the same number on the same rows."""
    toy, out = os.path.join(HERE, "fixtures", "toy"), str(tmp_path / "o")
    data = os.path.join(toy, "copy.jsonl")
    argv = ["--model", toy, "--dataset", data, "--prompt-template", "{question}=", "--steps", "60",
            "--prompts-per-step", "8", "--num-samples", "8", "--max-new-tokens", "2", "--lr", "3e-3",
            "--eval-every", "30", "--eval-dataset", data, "--output-dir", out]  # fmt: skip
    empg.train(empg.parse_args(argv))
    final = read_jsonl(os.path.join(out, "eval.jsonl"))[-1]
    assert final["step"] == 60 and final["test_score"] > 0
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(
        os.path.join(out, "checkpoint-000060"), dtype=torch.float32
    )
    m.load_state_dict(
        torch.load(os.path.join(out, "checkpoint-000060", "trainer_state.pt"), weights_only=False)[
            "master"
        ]
    )
    m.save_pretrained(str(tmp_path / "fp32"))
    import eval as ev_mod

    s = ev_mod.main(["--model", str(tmp_path / "fp32"), "--tokenizer", toy, "--dataset", data,
                     "--prompt-template", "{question}=", "--max-new-tokens", "2", "--batch-size", "64",
                     "--dtype", "fp32", "--output-dir", str(tmp_path / "e")])  # fmt: skip
    assert next(iter(s.values()))["accuracy"] == pytest.approx(final["test_score"])


# ---------------------------------------------------------------- memory: the worst step first; out of memory anywhere
def inject_oom(monkeypatch, tokens=math.inf, prefill_rows=math.inf):
    """Qwen2's forward raises torch.OutOfMemoryError above `tokens` input tokens, or for a prefill (a
    forward that fills a KV cache) of more than `prefill_rows` prompts."""
    from transformers import Qwen2ForCausalLM

    real = Qwen2ForCausalLM.forward

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, **kw):
        if input_ids.numel() > tokens or (cache is not None and input_ids.shape[0] > prefill_rows):
            raise torch.OutOfMemoryError("injected")
        return real(self, input_ids, attention_mask, position_ids, cache, **kw)

    monkeypatch.setattr(Qwen2ForCausalLM, "forward", forward)


def master_weights(out, step):
    return torch.load(os.path.join(out, f"checkpoint-{step:06d}", "trainer_state.pt"))["master"]


def test_the_memory_probe_halves_the_micro_batch_and_the_step_is_unchanged(
    model_dir, toy_jsonl, tmp_path, monkeypatch, capsys
):
    """Sequences are 1 prompt + 6 completion tokens: the probe's micro-batch of 4 (28 tokens) does not
    fit under 14, so the KV cache is freed before each M-step and then the micro-batch halved to 2."""
    argv = lambda out, *x: train_argv(model_dir, out, toy_jsonl, "--steps", "2", "--seed", "1", *x)
    small = str(tmp_path / "small")
    empg.train(empg.parse_args(argv(small, "--micro-batch-size", "2")))  # no probe on a CPU
    assert "memory probe skipped (no CUDA)" in capsys.readouterr().err
    inject_oom(monkeypatch, tokens=14)
    probed = str(tmp_path / "probed")
    empg.train(empg.parse_args(argv(probed, "--memory-probe", "on")))
    line = [l for l in capsys.readouterr().err.splitlines() if "empg: memory: " in l]
    assert len(line) == 1 and "--micro-batch-size 2" in line[0] and "KV cache freed" in line[0]
    a, b = master_weights(small, 2), master_weights(probed, 2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], v) for k, v in AutoModel(model_dir).state_dict().items())


def AutoModel(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


def test_the_e_step_in_chunks_gives_every_sample_and_resumes_exactly(
    model_dir, toy_jsonl, tmp_path, monkeypatch, capsys
):
    inject_oom(monkeypatch, prefill_rows=1)  # two prompts' prefill does not fit; one does
    argv = lambda out, steps, *x: train_argv(model_dir, out, toy_jsonl, "--steps", steps, "--save-every", "2",
                                             "--memory-probe", "on", "--log-samples", "6", "--seed", "1", *x)  # fmt: skip
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    empg.train(empg.parse_args(argv(full, "4")))
    assert "E-step 1 prompts at a time" in capsys.readouterr().err
    samples = read_jsonl(os.path.join(full, "samples.jsonl"))
    assert [sum(s["step"] == t for s in samples) for t in (1, 2, 3, 4)] == [6] * 4  # 2 prompts × 3
    empg.train(empg.parse_args(argv(part, "2")))
    empg.train(empg.parse_args(argv(part, "4", "--resume")))  # the run's choice, not a new probe
    assert "empg: memory: " not in capsys.readouterr().err.split("empg: done")[-2]
    a, b = master_weights(full, 4), master_weights(part, 4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_jsonl(os.path.join(full, "metrics.jsonl"))[-1]["loss"] == pytest.approx(
        read_jsonl(os.path.join(part, "metrics.jsonl"))[-1]["loss"], abs=0
    )


def test_the_e_step_slices_are_equal_so_one_kv_cache_serves_them(
    model_dir, toy_jsonl, tmp_path, monkeypatch, capsys
):
    """9 prompts, a prefill of 4 fits: 3 at a time (a divisor of 9), not 4 + 4 + 1, whose last slice
    would reallocate the KV cache twice a step (and, compiled, capture new graphs each time)."""
    inject_oom(monkeypatch, prefill_rows=4)
    argv = train_argv(
        model_dir, str(tmp_path / "o"), toy_jsonl, "--steps", "1", "--memory-probe", "on"
    )
    empg.train(empg.parse_args(argv + ["--prompts-per-step", "9"]))
    assert "E-step 3 prompts at a time" in capsys.readouterr().err


def test_out_of_memory_mid_run_is_one_line_and_resume_continues(
    model_dir, toy_jsonl, tmp_path, monkeypatch, capsys
):
    out, real, calls = str(tmp_path / "o"), empg.m_step, []

    def m_step(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(*a, **kw)

    monkeypatch.setattr(empg, "m_step", m_step)
    argv = lambda *x: train_argv(model_dir, out, toy_jsonl, "--steps", "4", "--save-every", "2", *x)
    with pytest.raises(SystemExit) as e:
        empg.train(empg.parse_args(argv()))
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and last.startswith("empg: error: out of memory after step 2: lower")
    assert "checkpoint 2 is whole: --resume continues" in last
    assert sorted(d for d in os.listdir(out) if "checkpoint" in d) == ["checkpoint-000002"]
    AutoModel(os.path.join(out, "checkpoint-000002"))  # loadable
    monkeypatch.setattr(empg, "m_step", real)
    empg.train(empg.parse_args(argv("--resume")))
    assert [m["step"] for m in read_jsonl(os.path.join(out, "metrics.jsonl"))] == [1, 2, 3, 4]


class Planted:
    """A pickle that runs a shell command when loaded."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_resume_refuses_a_planted_object_in_trainer_state(model_dir, toy_jsonl, tmp_path, capsys):
    out, marker = str(tmp_path / "o"), tmp_path / "pwned"
    empg.train(empg.parse_args(train_argv(model_dir, out, toy_jsonl, "--steps", "2")))
    state = os.path.join(out, "checkpoint-000002", "trainer_state.pt")
    torch.save(dict(torch.load(state), step=2, extra=Planted(marker)), state)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        empg.train(
            empg.parse_args(train_argv(model_dir, out, toy_jsonl, "--steps", "3", "--resume"))
        )
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "--resume: refused" in err[0]
    assert not marker.exists()


def test_eval_has_its_own_row_count_and_grades_alike_at_two(tmp_path):
    """40 problems and a 4-row E-step: on a CPU one eval batch of 40 rows; 7 rows a batch grade alike."""
    toy, sums = (
        os.path.join(HERE, "fixtures", "toy"),
        os.path.join(HERE, "fixtures", "toy", "sums.jsonl"),
    )
    argv = lambda out, *x: ["--model", toy, "--dataset", sums, "--eval-dataset", sums, "--eval-limit", "40",
                            "--prompts-per-step", "2", "--num-samples", "2", "--max-new-tokens", "6",
                            "--steps", "2", "--eval-every", "1", "--lr", "3e-3", "--output-dir", out, *x]  # fmt: skip
    empg.train(empg.parse_args(argv(str(tmp_path / "a"))))
    empg.train(empg.parse_args(argv(str(tmp_path / "b"), "--eval-rows", "7")))
    a, b = (read_jsonl(str(tmp_path / d / "eval.jsonl")) for d in "ab")
    assert [e["batch_rows"] for e in a] == [40] * 3 and [e["batch_rows"] for e in b] == [7] * 3
    for x, y in zip(a, b):
        assert (x["step"], x["test_score"], x["mean_len"], x["n"]) == (
            y["step"],
            y["test_score"],
            y["mean_len"],
            y["n"],
        )
    model, rows = tiny_model(std=0.5), [[5 + i % 40, 6 + i % 7] for i in range(40)]
    dec = empg.make_decoder(model, "static")
    whole = empg.sample(dec, rows, 1, 12, {7, 9}, 0, 0)
    assert whole == [
        c for i in range(0, 40, 7) for c in empg.sample(dec, rows[i : i + 7], 1, 12, {7, 9}, 0, 0)
    ]
    assert len({len(c) for c in whole}) > 1  # some rows stopped early


def test_report_to_tensorboard_writes_the_logs_scalars(model_dir, toy_jsonl, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = str(tmp_path / "o")
    argv = train_argv(model_dir, out, toy_jsonl, "--steps", "3", "--eval-every", "2", "--eval-dataset",
                      toy_jsonl, "--report-to", "tensorboard")  # fmt: skip
    empg.train(empg.parse_args(argv))
    acc = EventAccumulator(os.path.join(out, "tensorboard"))
    acc.Reload()
    for name, tag in (("metrics", "reward_mean"), ("metrics", "loss"), ("eval", "test_score")):
        rows = read_jsonl(os.path.join(out, f"{name}.jsonl"))
        got = [(s.step, s.value) for s in acc.Scalars(f"{name}/{tag}")]
        assert got == [(r["step"], pytest.approx(r[tag], rel=1e-6)) for r in rows], tag
    assert [s.step for s in acc.Scalars("eval/test_score")] == [0, 2, 3]


def test_report_to_a_missing_package_is_one_line(model_dir, toy_jsonl, tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("wandb"):
        pytest.skip("wandb is installed here")
    argv = train_argv(model_dir, str(tmp_path / "o"), toy_jsonl, "--report-to", "wandb")
    assert "--report-to wandb needs it installed: pip install wandb" in bad(argv, capsys)


def test_curves_png_is_drawn_at_the_end(model_dir, toy_jsonl, tmp_path):
    out = str(tmp_path / "o")
    empg.train(empg.parse_args(train_argv(model_dir, out, toy_jsonl, "--steps", "2")))
    png = open(os.path.join(out, "curves.png"), "rb").read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_score_gives_the_advantages_and_its_metrics():
    args = empg.Args(num_samples=2, reward_norm="token")
    r, lens = torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.tensor([3, 1, 1, 1])
    adv, m = empg.score(r, lens, args)
    # token-weighted: μ = 3/6, σ² = (3·¼ + 3·¼)/5 = 0.3 → z = ±0.5/√0.3
    z = 0.5 / math.sqrt(0.3 + 1e-8)
    want = 2 * (torch.sigmoid(torch.tensor([z, -z, -z, -z])) - 0.5)
    assert torch.allclose(adv, want) and m["adv_abs_mean"] == pytest.approx(
        want.abs().mean().item()
    )
    assert m["reward_mean"] == 0.25 and m["reward_std"] == pytest.approx(0.5)
    assert m["response_len_mean"] == 1.5


def test_clip_frac_counts_the_tokens_whose_clip_is_active():
    """verl's count: ρ = 1.5 clips when A > 0, not when A < 0; ρ = 0.5 the other way round."""
    args = empg.Args(algo="grpo", clip_eps=0.2)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.0]]))
    old, mask = torch.zeros(1, 3), torch.ones(1, 3)
    frac = lambda a: empg.micro_batch_loss(logp, old, None, None, mask, torch.tensor([a]), args)[1][
        "clip_frac"
    ]
    assert frac(1.0).item() == pytest.approx(1 / 3) and frac(-1.0).item() == pytest.approx(1 / 3)
    assert frac(0.0).item() == 0


def test_completions_stop_at_the_models_eos_unless_asked():
    tok, model = char_tokenizer(), tiny_model()
    assert empg.stop_ids(tok, model) == {0}  # <|endoftext|>: the author's MATH rollouts
    assert empg.stop_ids(tok, model, im_end=True) == {0, 1}  # --stop-at-im-end


def test_the_readme_tables_match_args_and_a_real_metrics_row(model_dir, toy_jsonl, tmp_path):
    """The README's flag table names every flag of Args and no other; its metrics.jsonl and eval.jsonl
    column lists are a real run's rows, in order."""
    import dataclasses, re

    readme = open(os.path.join(HERE, "README.md"), encoding="utf-8").read()
    table = readme.split("## Every flag")[1].split("\n## ")[0]
    first_cells = [l.split("|")[1] for l in table.splitlines() if l.startswith("| `--")]
    assert set(re.findall(r"`(--[a-z-]+)`", " ".join(first_cells))) == {
        empg.flag(f.name) for f in dataclasses.fields(empg.Args)
    }
    out = str(tmp_path / "o")
    empg.train(
        empg.parse_args(
            train_argv(model_dir, out, toy_jsonl, "--steps", "1", "--eval-dataset", toy_jsonl)
        )
    )
    for name in ("metrics.jsonl", "eval.jsonl"):
        listed = readme.split(f"- `{name}`, one row per ")[1].split(":", 1)[1].split(";")[0]
        assert re.findall(r"[a-z_0-9]+", listed.replace("`", "")) == list(
            read_jsonl(os.path.join(out, name))[0]
        )
    watch = readme.split("**What to watch**")[1].split("\n\n")[1]
    named = set(
        re.findall(r"`([a-z_*]+)`", " ".join(l.split("|")[1] for l in watch.splitlines()[2:]))
    )
    row = read_jsonl(os.path.join(out, "metrics.jsonl"))[0]
    assert {k for k in named if "*" not in k} <= set(row)


def test_gradient_checkpointing_leaves_the_step_unchanged(model_dir, toy_jsonl, tmp_path):
    """On CUDA it is on by default (auto); here it is asked for: the same step as without it."""
    out = {gc: str(tmp_path / gc) for gc in ("on", "off")}
    for gc, d in out.items():
        argv = train_argv(
            model_dir, d, toy_jsonl, "--steps", "1", "--seed", "1", "--gradient-checkpointing", gc
        )
        empg.train(empg.parse_args(argv))
    a, b = master_weights(out["on"], 1), master_weights(out["off"], 1)
    assert all(torch.allclose(a[k], b[k], atol=1e-7) for k in a)
    assert not all(torch.equal(a[k], v) for k, v in AutoModel(model_dir).state_dict().items())


def test_out_of_memory_in_the_final_evaluation_is_one_line_too(
    model_dir, toy_jsonl, tmp_path, monkeypatch, capsys
):
    real = empg.evaluate

    def evaluate(run, step):
        if step == run.args.steps:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(run, step)

    monkeypatch.setattr(empg, "evaluate", evaluate)
    argv = train_argv(
        model_dir, str(tmp_path / "o"), toy_jsonl, "--steps", "2", "--eval-dataset", toy_jsonl
    )
    with pytest.raises(SystemExit) as e:
        empg.train(empg.parse_args(argv))
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and last.startswith("empg: error: out of memory after step 2: lower")
    AutoModel(
        os.path.join(str(tmp_path / "o"), "checkpoint-000002")
    )  # the last checkpoint is whole
