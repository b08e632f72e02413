"""Text generation on the device runtime (edgestack.runtime.generate) from decoder packages.

Tiny random decoders (tests/decoder_models.py: 2 layers, hidden 64, vocab 128, weights of
std 0.3 so greedy argmax is decided) are compressed in torch, exported with a KV cache and
packed: GPT-2 with BitStack (a tiered package, max_batch 2, a word-level tokenizer) and
Llama (grouped-query attention) with low-rank (a compiled package, one tier). Greedy tokens
from the package equal the compressed torch model's (transformers' ``generate``); sampling,
stop tokens, the max_context/max_batch refusals, a re-tier during a request, the plan's
``kv_cache`` line and context fit, the CLI, and the peak RSS of fresh processes generating
to max_context at 3 budgets are checked.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import warnings

import numpy as np
import pytest

from edgestack.cli import main
from edgestack.core.decoding import Sampler
from edgestack.errors import BudgetError, FormatError, PackageError, TargetError
from edgestack.package import Package
from edgestack.runtime import (
    KV_ALIVE,
    Runtime,
    calibrate,
    context_fit,
    kv_cache_bytes,
    plan_memory,
    smallest_plan,
)
from edgestack.runtime.plan import SAFETY_FRACTION, SAFETY_MIN, page_up

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from decoder_models import VOCAB, tiny_decoder, torch_greedy  # noqa: E402

MAX_CONTEXT = 64
PROMPT = [[5, 17, 33, 42, 9, 64]]
NEW = 24


def _compressed(arch, method, **options):
    from edgestack.compress import compress

    model = tiny_decoder(arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compress(model, method, **options)
    return model


def _tokenizer(folder):
    """A word-level tokenizer over the tiny vocabulary: ``w0`` ... ``w127``."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text("{}")
    return folder


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """``(torch model, package)``: GPT-2, BitStack (2 blocks of rank 2), max_context 64,
    max_batch 2, with a tokenizer."""
    from edgestack.exporter import export_decoder
    from edgestack.packer.pack import pack

    tmp = tmp_path_factory.mktemp("gen_gpt2")
    model = _compressed("gpt2", "bitstack", n_blocks=2, k=2)
    export_decoder(model, tmp / "d.onnx", log=lambda _: None, parity=False)
    pack(tmp / "d.onnx", tmp / "d.pkg", max_context=MAX_CONTEXT, max_batch=2,
         tokenizer=_tokenizer(tmp / "tok"), log=lambda _: None)
    return model, tmp / "d.pkg"


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """``(torch model, package)``: Llama with GQA, low-rank 0.5, compiled for ort-cpu."""
    from edgestack.exporter import export_decoder
    from edgestack.pipeline import pack_model

    tmp = tmp_path_factory.mktemp("gen_llama")
    model = _compressed("llama", "lowrank", ratio=0.5)
    export_decoder(model, tmp / "l.onnx", log=lambda _: None, parity=False)
    pack_model(tmp / "l.onnx", tmp / "l.pkg", max_context=MAX_CONTEXT, log=lambda _: None)
    return model, tmp / "l.pkg"


def _torch_tokens(model, prompt, new=NEW):
    return torch_greedy(model, torch.tensor(prompt), new_tokens=new)


@pytest.mark.slow
def test_greedy_equals_the_compressed_torch_model(gpt2, llama):
    """Through the package (BitStack served exactly: fp32 and on the fly; low-rank
    compiled), greedy tokens with the KV cache equal torch's; the golden prompt has an empty
    cache and the self-test passes."""
    for model, pkg, options in ((*gpt2, {"form": "fp32"}), (*gpt2, {"materialize": 0}),
                                (*llama, {})):
        with Runtime(pkg, calibrate=False, **options) as rt:
            gen = rt.generate(PROMPT, NEW, stop=())
            np.testing.assert_array_equal(gen.tokens, _torch_tokens(model, PROMPT))
            assert gen.lengths == [NEW] and gen.tier == len(rt.package.tiers) - 1
            assert gen.prefill_tokens_per_s > 0 and gen.decode_tokens_per_s > 0
            assert rt.self_test()["passed"] is True
            golden = rt.package.golden()[0]
            assert golden["past_key_values.0.key"].shape[2] == 0
    man = Package.open(gpt2[1]).manifest
    dec = man.runtime.decoder
    assert (dec.max_context, dec.max_batch, dec.prefill_chunk) == (MAX_CONTEXT, 2, MAX_CONTEXT)
    assert dec.tokenizer[0] == "tokenizer/tokenizer.json"
    assert man.files["tokenizer/tokenizer.json"].role == "tokenizer"
    assert len(man.tiers) > 1          # BitStack keeps its tiers


def test_left_padded_batch_equals_torch(gpt2):
    """Two prompts of different lengths, left-padded by the runtime, give each prompt's own
    torch tokens (torch run with the same padding and mask)."""
    model, pkg = gpt2
    prompts = [[5, 17, 33, 42, 9, 64], [70, 3, 8]]
    with Runtime(pkg, calibrate=False, form="fp32") as rt:
        gen = rt.generate(prompts, 12, stop=())
    ids = torch.tensor([prompts[0], [0, 0, 0, *prompts[1]]])
    mask = torch.tensor([[1] * 6, [0, 0, 0, 1, 1, 1]])
    np.testing.assert_array_equal(gen.tokens, torch_greedy(model, ids, mask, new_tokens=12))


def test_sampling_is_seeded_and_respects_top_k_top_p(gpt2):
    """The same seed gives the same tokens; top_k=1 is greedy at any temperature; the
    sampler's distribution is zero outside the top k and outside the smallest top-p set."""
    _model, pkg = gpt2
    with Runtime(pkg, calibrate=False, form="fp32") as rt:
        greedy = rt.generate(PROMPT, NEW, stop=()).tokens
        runs = [rt.generate(PROMPT, NEW, temperature=1.5, seed=s, stop=()).tokens
                for s in (7, 7, 8)]
        np.testing.assert_array_equal(runs[0], runs[1])
        assert not np.array_equal(runs[0], runs[2]) or not np.array_equal(runs[0], greedy)
        np.testing.assert_array_equal(
            rt.generate(PROMPT, NEW, temperature=2.0, top_k=1, seed=3, stop=()).tokens, greedy)
        np.testing.assert_array_equal(
            rt.generate(PROMPT, NEW, temperature=2.0, top_p=1e-6, seed=3, stop=()).tokens,
            greedy)
    logits = np.random.default_rng(0).standard_normal((3, 50))
    p = Sampler(1.0, top_k=5).probabilities(logits)
    top5 = np.argsort(-logits, axis=1)[:, :5]
    assert ((p > 0).sum(axis=1) == 5).all()
    assert all(set(np.flatnonzero(p[i])) == set(top5[i]) for i in range(3))
    full = Sampler(1.0).probabilities(logits)
    p = Sampler(1.0, top_p=0.5).probabilities(logits)
    for i in range(3):
        kept = np.flatnonzero(p[i])
        mass = np.sort(full[i])[::-1]
        n = int(np.searchsorted(np.cumsum(mass), 0.5) + 1)   # smallest set reaching 0.5
        assert len(kept) == n and set(kept) == set(np.argsort(-full[i])[:n])
    draws = Sampler(1.0, top_k=2, seed=0)(np.tile(logits[:1], (2000, 1)))
    assert set(draws) == set(top5[0, :2])
    with pytest.raises(FormatError, match="top_p must be in"):
        Sampler(1.0, top_p=1.5)


def test_stop_tokens_stop(gpt2):
    """A stop token ends its sequence (the token kept, then the pad token) and the request
    ends when every sequence has stopped."""
    _model, pkg = gpt2
    with Runtime(pkg, calibrate=False, form="fp32") as rt:
        greedy = rt.generate(PROMPT, NEW, stop=()).tokens[0]
        stop = int(greedy[3])
        first = int(np.flatnonzero(greedy == stop)[0])
        gen = rt.generate(PROMPT, NEW, stop=[stop])
        assert gen.tokens.shape == (1, first + 1) and gen.lengths == [first + 1]
        np.testing.assert_array_equal(gen.tokens[0], greedy[:first + 1])
        streamed = []
        rt.generate(PROMPT, NEW, stop=stop, stream=lambda t: streamed.append(int(t[0])))
        assert streamed == greedy[:first + 1].tolist()


def test_refusals(gpt2, small_pkg, small_model, tmp_path):
    """Prompt + new tokens beyond max_context, a batch beyond max_batch, bad options and a
    package that is not a decoder are refused with what to do."""
    _model, pkg = gpt2
    with Runtime(pkg, calibrate=False) as rt:
        with pytest.raises(BudgetError, match=r"= 65 is more than the package's max_context "
                                              r"64 .*--max-context 65"):
            rt.generate([[1] * 40], 25)
        with pytest.raises(BudgetError, match="batch 3 is more than the package's max_batch 2"):
            rt.generate([[1], [2], [3]], 2)
        with pytest.raises(FormatError, match="temperature must be"):
            rt.generate(PROMPT, 2, temperature=-1)
        with pytest.raises(FormatError, match=r"token ids must be in \[0, 128\)"):
            rt.generate([[1, 500]], 2)
    with Runtime(small_pkg, calibrate=False) as rt, pytest.raises(
            TargetError, match="not a text-generation package"):
        rt.generate([[1, 2]], 2)
    from edgestack.packer.pack import pack

    with pytest.raises(PackageError, match="max_context apply to a decoder"):
        pack(small_model[0], tmp_path / "x.pkg", max_context=8)


def test_retier_during_a_request_keeps_its_tokens(gpt2):
    """A re-tier while a request runs applies to the next request: a shrink waits for the
    request (its tokens are the top tier's), a grow leaves it on tier 0."""
    _model, pkg = gpt2
    with Runtime(pkg, calibrate=False, materialize=0) as rt:
        top = rt.tier
        full = rt.generate(PROMPT, NEW, stop=()).tokens
        rt.retier(tier=0)
        low = rt.generate(PROMPT, NEW, stop=()).tokens
        assert not np.array_equal(full, low), "tier 0 and the top tier give the same tokens"
        rt.retier(tier=top)

        steps = rt.generate_iter(PROMPT, NEW, stop=())
        got = [next(steps), next(steps)]
        done = threading.Event()
        t = threading.Thread(target=lambda: (rt.retier(tier=0), done.set()))
        t.start()
        got += list(steps)          # the shrink waits for the request
        t.join(30)
        assert done.is_set() and rt.tier == 0
        np.testing.assert_array_equal(np.stack(got, axis=1), full)

        steps = rt.generate_iter(PROMPT, NEW, stop=())
        got = [next(steps)]
        rt.retier(tier=top)          # a grow does not wait
        assert rt.tier == top
        got += list(steps)
        np.testing.assert_array_equal(np.stack(got, axis=1), low)


def test_plan_kv_line_and_context_fit(gpt2, capsys):
    """The kv_cache line is bytes per token x max_context x max_batch x KV_ALIVE, in the
    total; per tier the context that fits is the most tokens whose cache fits the budget."""
    _model, pkg = gpt2
    p = Package.open(pkg)
    per_token = 2 * 2 * 4 * 16 * 4           # 2 layers x (key + value) x 4 heads x 16 x f32
    assert p.manifest.runtime.decoder.kv_bytes_per_token == per_token
    plan = smallest_plan(p, 0)
    assert plan.kv_bytes == page_up(per_token * MAX_CONTEXT * 2 * KV_ALIVE) > 0
    assert plan.expected_bytes == (plan.graph_bytes + plan.weights_bytes + plan.overhead_bytes
                                   + plan.layer_bytes + plan.arena_bytes + plan.kv_bytes)
    top = len(p.tiers) - 1
    base = smallest_plan(p, top).expected_bytes - plan.kv_bytes
    for tokens in (10, 40):                  # a budget whose top tier holds that context
        kv = kv_cache_bytes(p, tokens)
        budget = int(max(base + kv + SAFETY_MIN, (base + kv) * (1 + SAFETY_FRACTION))) + 1
        fit = dict(context_fit(p, budget))
        assert tokens <= fit[top] <= tokens + 2, fit
        assert [fit[t] for t in sorted(fit)] == sorted(fit.values(), reverse=True)
    budget = smallest_plan(p, 0).total + 2**20     # tier 0 at max_context fits
    planned = plan_memory(p, budget)
    assert planned.context_fit == context_fit(p, budget)
    assert dict(planned.context_fit)[planned.tier] == MAX_CONTEXT
    big = dict(context_fit(p, 2**30))
    assert set(big.values()) == {MAX_CONTEXT}
    assert main(["plan", str(pkg), "--budget", "1GiB", "--no-calibrate", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)["plan"]
    assert out["kv_cache"] == {"bytes": plan.kv_bytes, "tokens": MAX_CONTEXT,
                               "alive": KV_ALIVE}
    assert [c["tokens"] for c in out["context_fit"]] == [MAX_CONTEXT] * len(p.tiers)
    assert main(["plan", str(pkg), "--budget", "1GiB", "--no-calibrate"]) == 0
    text = capsys.readouterr().out
    assert "kv_cache" in text and "context that fits the budget, per tier" in text


def test_cli_run_prompt(gpt2, llama, capsys):
    """`run --prompt` streams the decoded greedy text (its tokens: the runtime's); --json
    gives tokens, text, tokens/s, tier and plan; a package without a tokenizer is refused."""
    _model, pkg = gpt2
    prompt = " ".join(f"w{i}" for i in PROMPT[0])
    with Runtime(pkg, calibrate=False) as rt:
        want = rt.generate(PROMPT, 8).tokens[0].tolist()
    assert main(["run", str(pkg), "--prompt", prompt, "--max-new-tokens", "8",
                 "--no-calibrate", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompt_tokens"] == PROMPT[0] and out["tokens"] == want[:len(out["tokens"])]
    assert out["text"] == " ".join(f"w{t}" for t in out["tokens"])
    assert out["decode_tokens_per_s"] > 0 and out["plan"]["kv_cache"]["tokens"] == MAX_CONTEXT
    assert main(["run", str(pkg), "--prompt", prompt, "--max-new-tokens", "8",
                 "--no-calibrate", "--temperature", "0.9", "--top-k", "5", "--seed", "1"]) == 0
    cap = capsys.readouterr()
    assert 1 <= len(cap.out.split()) <= 8 and "decode" in cap.err
    assert main(["run", str(llama[1]), "--prompt", prompt, "--no-calibrate"]) != 0
    assert "the package has no tokenizer; repack with --tokenizer DIR" in capsys.readouterr().err


PEAK_GENERATE = r"""
import edgestack.runtime as R
import json, sys
import onnxruntime, numpy as np
from edgestack.profiler.probe import peak_rss as hwm
pkg, budget = sys.argv[1], int(sys.argv[2])
base = hwm()
rt = R.Runtime(pkg, budget)
dec = rt.package.manifest.runtime.decoder
n = dec.max_context
prompts = [[(7 * i + j) % 100 for j in range(n // 2)] for i in range(dec.max_batch)]
gen = rt.generate(prompts, n - n // 2, stop=())
print(json.dumps({'hwm': hwm(), 'base': base, 'tier': rt.tier, 'plan': rt.plan.total,
                  'kv': rt.plan.kv_bytes, 'new': int(gen.tokens.shape[1]),
                  'torch': 'torch' in sys.modules}))
"""


def test_peak_rss_generating_to_max_context(tmp_path):
    """Fresh processes generate max_batch sequences to max_context (prompt half of it) at 3
    budgets planned with this machine's calibrated costs, each 1 MiB above its plan: the
    peak RSS increase stays within the budget, KV cache included."""
    from edgestack.exporter import export_decoder
    from edgestack.packer.pack import pack

    model = _compressed("gpt2", "bitstack", n_blocks=3, k=8)
    export_decoder(model, tmp_path / "d.onnx", log=lambda _: None, parity=False)
    pkg = pack(tmp_path / "d.onnx", tmp_path / "d.pkg", max_context=256, max_batch=2,
               log=lambda _: None).path
    p = Package.open(pkg)
    costs = calibrate(p)
    n = len(p.tiers)
    for tier in (0, n // 2, n - 1):
        plan = smallest_plan(p, tier, costs)
        budget = plan.total + 2**20
        out = subprocess.run([sys.executable, "-c", PEAK_GENERATE, str(pkg), str(budget)],
                             capture_output=True, text=True, check=True, timeout=300)
        run = json.loads(out.stdout.strip().splitlines()[-1])
        assert run["torch"] is False and run["new"] == 128 and run["tier"] >= tier, run
        assert run["kv"] == page_up(1024 * 256 * 2 * KV_ALIVE)
        increase = run["hwm"] - run["base"]
        assert increase <= budget, (increase, budget, run)


def test_cli_pack_decoder_options(gpt2, small_model, tmp_path, capsys):
    """`pack --max-context/--max-batch/--prefill-chunk/--tokenizer` reach the manifest; a
    context beyond the model's positions and the options on a model that is not a decoder
    are refused."""
    src = gpt2[1].parent
    out = tmp_path / "g.pkg"
    assert main(["pack", str(src / "d.onnx"), "--out", str(out), "--max-context", "32",
                 "--max-batch", "3", "--prefill-chunk", "8", "--tokenizer",
                 str(src / "tok"), "--json"]) == 0
    capsys.readouterr()
    dec = Package.open(out).manifest.runtime.decoder
    assert (dec.max_context, dec.max_batch, dec.prefill_chunk) == (32, 3, 8)
    assert dec.tokenizer == ("tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json")
    assert main(["pack", str(src / "d.onnx"), "--out", str(tmp_path / "h.pkg"),
                 "--max-context", "300"]) == 2
    assert "more than the model's 256 positions" in capsys.readouterr().err
    assert main(["pack", str(small_model[0]), "--out", str(tmp_path / "i.pkg"),
                 "--max-batch", "2"]) == 2
    assert "max_batch apply to a decoder" in capsys.readouterr().err


def test_a_tied_head_is_one_copy_with_prepacking_on(gpt2, llama, monkeypatch, tmp_path,
                                                     capsys):
    """GPT-2's LM head is tied to its word embedding: packed with ``tied_tables="float"``
    the shared table is an overridable initializer in every graph, which ONNX Runtime does
    not prepack (packing the head's Gemm B copied the table; bench/prepack_head.py), so every
    session keeps prepacking on for the other weights; packed int8 (the default) the table
    is gone (int8 lookups and head); an untied decoder has neither."""
    import onnx

    from edgestack.packer.pack import pack

    inits = {t.name for t in onnx.load(str(gpt2[1] / "model.onnx"),
                                       load_external_data=False).graph.initializer}
    assert "lm_head.weight" not in inits and "lm_head.weight.head_q" in inits  # int8
    float_pkg = tmp_path / "float.pkg"
    pack(gpt2[1].parent / "d.onnx", float_pkg, max_context=MAX_CONTEXT, max_batch=2,
         tied_tables="float", log=lambda _: None)
    gpt2 = (gpt2[0], float_pkg)
    def served(pkg, budget=None, **options):
        options.setdefault("calibrate", False)
        with Runtime(pkg, budget, **options) as rt, rt.pinned() as st:
            opts = st.session.get_session_options()
            try:
                on = opts.get_session_config_entry("session.disable_prepacking") != "1"
            except Exception:  # the entry was never set: ORT's default, on
                on = True
            shared = [v.name for v in st.session.get_overridable_initializers()]
            return rt.plan.graph, on, shared

    for form in ("int8", "fp32", "nbits8"):
        assert served(gpt2[1], "1GB", form=form) == (form, True, ["lm_head.weight"])
    assert served(gpt2[1], materialize=0) == ("plain", False, ["lm_head.weight"])  # fed
    assert served(gpt2[1], materialize=1) == ("mixed", False, ["lm_head.weight"])
    assert served(llama[1], "1GB") == ("plain", True, [])
    assert served(gpt2[1], "1GB", form="int8", prepack="off") == ("int8", False,
                                                                   ["lm_head.weight"])
    with pytest.raises(TargetError, match="prepack must be 'on' or 'off'"):
        Runtime(gpt2[1], calibrate=False, prepack="auto")
    # `edgestack plan` shows the plan the runtime serves (the same calibrated costs)
    monkeypatch.setenv("EDGESTACK_CACHE_DIR", str(tmp_path))
    from edgestack.cli import main

    with Runtime(gpt2[1], "1GB", form="int8") as rt:
        plan = rt.plan.to_dict()
    capsys.readouterr()
    assert main(["plan", str(gpt2[1]), "--budget", "1GB", "--form", "int8", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)["plan"]
    assert (shown["total"], shown["graph"]) == (plan["total"], plan["graph"])
