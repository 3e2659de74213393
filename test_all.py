"""The nanopapers test suite: every script's smoke run plus properties that fail when the code is wrong.

Run: python -m pytest -q            (add -m "not slow" to skip the torchrun runs)
     python -m pytest -q -k copying (one script's tests: every test is named test_<script>_...)
Layout: shared helpers, then common.py, then one section per script in README order.
"""
import collections
import dataclasses
import importlib
import inspect
import json
import math
import os
import random
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = ("copying", "icl_markov", "moe", "linear_ntp", "turing_programs", "shampoo", "trail", "lora_cat",
           "ardt", "transcendence")
NO_DDP = ("shampoo",)  # scripts that train no network data-parallel (torchrun is refused in one line)

# ======================================================================
# shared helpers
# ======================================================================


def smoke(module, tmp_path, **overrides) -> dict:
    """Run `module`'s smoke preset in-process on the CPU; return its results JSON (config, metrics, ...)."""
    cfg = common.config_from_preset(module.Config, module.PRESETS, "smoke", device="cpu", out=str(tmp_path),
                                    **overrides)
    with common.session(cfg):
        module.run(cfg)
    with open(os.path.join(tmp_path, module.__name__ + ".json")) as f:
        return json.load(f)


def run_script(script, *args, timeout=120, env=None):
    """Run `python <script>.py args...` here; returns the CompletedProcess (text output)."""
    return subprocess.run([sys.executable, f"{script}.py", *map(str, args)], cwd=HERE, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def torchrun(script, tmp_path, *args, nproc=2, timeout=240):
    """Run a script under torchrun (gloo, CPU); returns the CompletedProcess."""
    exe = shutil.which("torchrun")
    cmd = ([exe] if exe else [sys.executable, "-m", "torch.distributed.run"]) + [
        "--standalone", f"--nproc_per_node={nproc}", f"{script}.py", "--preset", "smoke", "--device", "cpu",
        "--out", str(tmp_path), *map(str, args)]
    return subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def assert_causal(forward, vocab: int, T: int = 24, cut: int = 13, batch: int = 2, atol=1e-5):
    """forward(idx (B, T)) -> (B, T, V): outputs before `cut` ignore tokens from `cut` on; later ones do not."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (batch, T), generator=g)
    y = x.clone()
    y[:, cut:] = (y[:, cut:] + 1 + torch.randint(0, vocab - 1, (batch, T - cut), generator=g)) % vocab
    with torch.no_grad():
        a, b = forward(x), forward(y)
    assert torch.allclose(a[:, :cut], b[:, :cut], atol=atol), "a past output depends on a future token"
    assert not torch.allclose(a[:, cut:], b[:, cut:], atol=atol), "the output ignores its own inputs"


def tiny_gpt(vocab=13, pos="learned", n_layer=2, n_head=4, n_embd=32, seed=0, **kw) -> common.GPT:
    torch.manual_seed(seed)
    return common.GPT(common.GPTConfig(vocab_size=vocab, block_size=64, n_layer=n_layer, n_head=n_head,
                                       n_embd=n_embd, pos=pos, **kw)).eval()


def copy_out(*objs) -> dict:
    """Paste the source of each function/class into a fresh namespace holding only torch, nn, F, math and
    numpy (what a user's new file would import) and return that namespace: a piece must run from there."""
    ns = {"torch": torch, "nn": nn, "F": F, "math": math, "np": np, "__name__": "pasted"}
    for obj in objs:
        exec(compile(inspect.getsource(obj), f"<pasted {obj.__name__}>", "exec"), ns)
    return ns


def bad_input_cases(module):
    """Bad inputs derived from a script's own Config: each must be one `error:` line, exit 2, no work."""
    fields = {f.name: f for f in dataclasses.fields(module.Config)}
    cfg = common.config_from_preset(module.Config, module.PRESETS, "smoke", device="cpu", out="results")
    flag = lambda n: "--" + n.replace("_", "-")
    cases = [(["--preset", "no-such-preset"], "unknown preset"), (["--seeds", "0"], "--seeds"),
             (["--seeds", "-1"], "--seeds"), (["--out", "/proc/no/such/dir"], "--out"),
             (["--device", "tpu"], "unknown device")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "CUDA"))
    lr = next((n for n in fields if common._ALWAYS_POSITIVE.search(n) and "lr" in n
               and isinstance(getattr(cfg, n), float)), None)
    if lr:
        cases += [([flag(lr), "nan"], flag(lr)), ([flag(lr), "-1"], flag(lr)), ([flag(lr), "inf"], flag(lr))]
    batch = next((n for n in fields if "batch" in n and isinstance(getattr(cfg, n), int)), None)
    if batch:
        cases += [([flag(batch), "0"], flag(batch)), ([flag(batch), "-4"], flag(batch))]
    for n in fields:
        if isinstance(getattr(cfg, n), tuple) and getattr(cfg, n) and n not in module.Config.MAY_BE_EMPTY:
            cases.append(([flag(n), ","], flag(n)))
            break
    for n in module.Config.POSITIVE:
        if isinstance(getattr(cfg, n), int):
            cases.append(([flag(n), "0"], flag(n)))
    return [(["--preset", "smoke", "--device", "cpu"] + argv if argv[0] != "--preset" else argv, needle)
            for argv, needle in cases]

# ======================================================================
# common.py
# ======================================================================


@dataclasses.dataclass
class TinyConfig(common.BaseConfig):
    n: int = 3                          # a size
    lens: tuple[int, ...] = (1, 2)      # lengths
    lr: float = 1e-3                    # a learning rate
    flag: bool = True                   # a switch
    POSITIVE = ("n",)


TINY_PRESETS = {"smoke": {"n": 1}, "quick": {"n": 5}, "full": {"n": 9}}


def test_common_parse_args_presets_and_flags(tmp_path):
    cfg = common.parse_args(TinyConfig, TINY_PRESETS, ["--device", "cpu", "--out", str(tmp_path)])
    assert cfg.preset == "quick" and cfg.n == 5  # CPU defaults to quick
    cfg = common.parse_args(TinyConfig, TINY_PRESETS, ["--preset", "smoke", "--n", "7", "--lens", "3,4",
                                                       "--no-flag", "--out", str(tmp_path)])
    assert (cfg.n, cfg.lens, cfg.flag) == (7, (3, 4), False)  # explicit flags beat the preset


@pytest.mark.parametrize("argv, needle", [
    (["--preset", "no-such-preset"], "unknown preset"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "cuda:99"], "cuda"),
    (["--device", "tpu"], "unknown device"),
    (["--n", "0"], "--n must be > 0"),
    (["--n", "abc"], "invalid int"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--lens", ","], "--lens needs at least one value"),
    (["--lens", "3,-1"], "--lens must be >= 0"),
    (["--seeds", "0"], "--seeds must be > 0"),
    (["--out", "/proc/no/such"], "--out /proc/no/such: cannot write"),
])
def test_common_bad_input_is_one_line_error(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        common.parse_args(TinyConfig, TINY_PRESETS, argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and "Traceback" not in err


def test_common_help_shows_comments_and_the_chosen_presets_defaults(capsys):
    for argv, n in ((["-h"], "5"), (["--preset", "smoke", "-h"], "1")):
        with pytest.raises(SystemExit):
            common.parse_args(TinyConfig, TINY_PRESETS, argv)
        out = " ".join(capsys.readouterr().out.split())
        assert f"a size (default: {n})" in out and "lengths (default: 1,2)" in out


def test_common_save_results_is_atomic_under_concurrent_writers(tmp_path):
    cfg = common.config_from_preset(TinyConfig, TINY_PRESETS, "smoke", device="cpu", out=str(tmp_path))
    errors, reads = [], []

    def writer(k):
        try:
            for i in range(60):
                common.save_results("x", cfg, {"a/b": float(k * 1000 + i), "nan": float("nan")})
        except Exception as e:  # noqa: BLE001 - any failure is the test's finding
            errors.append(repr(e))

    def reader():
        for _ in range(200):
            try:
                with open(tmp_path / "x.json") as f:
                    reads.append(json.load(f)["metrics"]["nan"])
            except FileNotFoundError:
                pass
    threads = [threading.Thread(target=writer, args=(k,)) for k in range(2)] + [threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and all(r is None for r in reads)  # every read parsed; NaN is written as null
    blob = json.loads((tmp_path / "x.json").read_text())
    assert blob["complete"] and "argv" in blob["env"] and "git_commit" in blob["env"]
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    with pytest.raises(TypeError):
        common.save_results("x", cfg, {"label": "text"})


def test_common_over_seeds_reports_mean_and_std(tmp_path):
    cfg = common.config_from_preset(TinyConfig, TINY_PRESETS, "smoke", device="cpu", out=str(tmp_path),
                                    seed=3, seeds=3)
    runs = common.over_seeds(cfg, lambda c: {"acc/m": float(c.seed), "n": 1}, name="s")
    assert runs.seeds == [3, 4, 5] and runs.mean["acc/m"] == 4.0 and runs.std["acc/m"] == pytest.approx(1.0)
    assert runs.cell("acc/m") == "4.000 ± 1.000" and runs.cell("missing") == "-"
    common.save_results("s", cfg, runs)
    blob = json.loads((tmp_path / "s.json").read_text())
    assert blob["metrics_std"]["acc/m"] == pytest.approx(1.0) and len(blob["per_seed"]) == 3
    one = common.over_seeds(dataclasses.replace(cfg, seeds=1), lambda c: ({"a": 2.0}, "curve"))
    assert one.cell("a") == "2.000" and one.std == {} and one.extras == ["curve"]


def test_common_token_mean_matches_the_plain_mean_in_one_process():
    logits, targets = torch.randn(3, 5, 7), torch.randint(0, 7, (3, 5))
    targets[0, :2] = -100
    s, n = common.cross_entropy_sum(logits, targets)
    ref = F.cross_entropy(logits.reshape(-1, 7), targets.reshape(-1), ignore_index=-100)
    assert n == 13 and torch.allclose(common.token_mean(s, n), ref)
    assert torch.allclose(common.masked_cross_entropy(logits, targets), ref)


def test_common_lr_schedule():
    assert common.lr_at(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert common.lr_at(10, 100, 1.0, 10) == pytest.approx(1.0)
    assert common.lr_at(99, 100, 1.0, 10, "linear") < 0.02
    assert common.lr_at(100, 100, 1.0, 10, "cosine", 0.1) == pytest.approx(0.1)


def test_common_tokenizer_roundtrip():
    tok = common.Tokenizer(list("ab") + ["$", "|", "."])
    assert tok.encode("$ab|ab.") == [2, 0, 1, 3, 0, 1, 4] and tok.decode(tok.encode("$ba|.")) == "$ba|."
    with pytest.raises(ValueError):
        tok.encode("A")


@pytest.mark.parametrize("pos", ["none", "learned", "alibi", "hard_alibi", "rope"])
def test_common_gpt_attention_is_causal(pos):
    m = tiny_gpt(pos=pos)
    assert_causal(lambda x: m(x)[0], vocab=13, T=30, cut=17)


@pytest.mark.parametrize("pos", ["none", "learned", "alibi", "hard_alibi", "rope"])
def test_common_gpt_kv_cache_matches_full_forward(pos):
    m = tiny_gpt(vocab=11, pos=pos, seed=1)
    x = torch.randint(0, 11, (3, 20))
    with torch.no_grad():
        full = m(x)[0]
        cache = m.new_cache()
        parts = [m(x[:, :7], cache=cache)[0]] + [m(x[:, t:t + 1], cache=cache)[0] for t in range(7, 20)]
        assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)
        g = m.generate(x[:, :5], 8, greedy=True)
        for t in range(5, 13):  # each greedy token is the argmax of a full forward over its prefix
            assert torch.equal(g[:, t], m(g[:, :t])[0][:, -1].argmax(-1))


def test_common_hard_alibi_heads_see_only_their_window():
    T = 12
    bias = common.positional_bias("hard_alibi", 4, torch.arange(T), torch.arange(T), (1, 2, 4, 0))
    probs = torch.softmax(torch.randn(4, T, T) + bias, -1)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    for h, w in enumerate((1, 2, 4)):
        outside = (j > i) | (i - j >= w)
        assert probs[h][outside].abs().max() == 0 and torch.allclose(probs[h].sum(-1), torch.ones(T))
    causal = torch.zeros(T, T).masked_fill(j > i, float("-inf"))
    assert torch.equal(bias[3], causal)  # the window-0 head is plain causal attention (NoPE)
    # in a model whose heads are all windowed, a token further back than every window never matters
    m = tiny_gpt(vocab=7, pos="hard_alibi", n_layer=1, n_head=2, n_embd=16, hard_windows=(1, 3))
    x = torch.randint(0, 7, (2, 10))
    y = x.clone()
    y[:, 2] = (y[:, 2] + 1) % 7
    with torch.no_grad():
        a, b = m(x)[0], m(y)[0]
    assert torch.allclose(a[:, 5:], b[:, 5:], atol=1e-6)  # positions >= 2 + 3 do not see position 2
    assert not torch.allclose(a[:, 2:5], b[:, 2:5], atol=1e-4)


def test_common_alibi_slopes_and_translation_invariance():
    assert torch.allclose(common.alibi_slopes(4), torch.tensor([2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8]))
    bias = common.positional_bias("alibi", 4, torch.arange(9), torch.arange(9))
    assert bias[1, 5, 2] == pytest.approx(-3 * 2 ** -4) and bias[0, 2, 5] == float("-inf")


def test_common_attention_copies_out_with_torch_alone():
    ns = copy_out(common.alibi_slopes, common.positional_bias, common.rope_rotate, common.CausalSelfAttention)
    for pos, windows in (("hard_alibi", (1, 2, 0, 0)), ("alibi", ()), ("rope", ()), ("none", ())):
        torch.manual_seed(0)
        ours = common.CausalSelfAttention(16, 4, pos, windows).eval()
        pasted = ns["CausalSelfAttention"](16, 4, pos, windows).eval()
        pasted.load_state_dict(ours.state_dict())
        x = torch.randn(2, 9, 16)
        assert torch.allclose(ours(x), pasted(x), atol=1e-6)
        assert_causal(lambda t: pasted(F.one_hot(t, 16).float()), vocab=16, T=12, cut=7)


def test_common_stages_and_step_log_print_an_eta(capsys):
    stages = common.Stages({"a": 1, "b": 3})
    with stages("a"):
        pass
    with stages("b"):
        pass
    out = capsys.readouterr().out
    assert "[stage 1/2: a]" in out and "[stage 2/2: b]" in out and "eta" in out
    assert common.step_log(10, 100, 0.0, loss=0.5).startswith("step 10/100 | loss 0.5 |")


# ---------------------------------------------------------------- every script: input, help, torchrun
# Per-script flags that make the torchrun smoke shorter (the part that trains data-parallel stays).
TORCHRUN_ARGS = {s: [] for s in SCRIPTS}
# Metrics that must agree between one process and two (same global batch, token-weighted loss).
TORCHRUN_CLOSE = {s: [] for s in SCRIPTS}


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_bad_input_is_one_line_before_any_work(script, capsys):
    module = importlib.import_module(script)
    for argv, needle in bad_input_cases(module):
        with pytest.raises(SystemExit) as e:
            common.parse_args(module.Config, module.PRESETS, argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2, (argv, err)
        assert len(err.splitlines()) == 1 and err.startswith("error:") and needle in err, (argv, err)


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_entry_point_refuses_an_unwritable_out_at_once(script):
    r = run_script(script, "--preset", "smoke", "--device", "cpu", "--out", "/proc/no/such/dir", timeout=30)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == [l for l in r.stderr.strip().splitlines() if l.startswith("error:")]


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_help_lists_every_field_with_its_comment(script, capsys):
    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as e:
        common.parse_args(module.Config, module.PRESETS, ["--preset", "smoke", "-h"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    notes = common._field_comments(module.Config)
    for f in dataclasses.fields(module.Config):
        assert "--" + f.name.replace("_", "-") in out, f.name
        assert notes.get(f.name), f"{script}: field {f.name} has no comment for -h"


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_script_torchrun_two_processes_match_one(script, tmp_path):
    if script in NO_DDP:
        r = torchrun(script, tmp_path, timeout=120)
        assert r.returncode == 2 and "torchrun" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
        return
    module = importlib.import_module(script)
    r = torchrun(script, tmp_path / "two", *TORCHRUN_ARGS[script])
    assert r.returncode == 0, r.stderr[-3000:]
    two = json.loads((tmp_path / "two" / f"{script}.json").read_text())
    assert two["env"]["world_size"] == 2
    cfg = common.parse_args(module.Config, module.PRESETS, ["--preset", "smoke", "--device", "cpu", "--out",
                                                            str(tmp_path / "one"), *TORCHRUN_ARGS[script]])
    with common.session(cfg):
        module.run(cfg)
    one = json.loads((tmp_path / "one" / f"{script}.json").read_text())
    assert set(one["metrics"]) == set(two["metrics"])
    for k in TORCHRUN_CLOSE[script]:
        assert abs(one["metrics"][k] - two["metrics"][k]) <= 0.05, (k, one["metrics"][k], two["metrics"][k])
