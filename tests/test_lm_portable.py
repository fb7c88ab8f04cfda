"""The cached HF folder reads the same under transformers 4.56-4.57 (circuit-tracer's range) and
5.x (the default pins): rotary base and tokenizer class, then our HookedTransformer builder.

Runs in both CI environments. The folder is written the way transformers 5 writes it (rotary base
only under ``rope_parameters``, tokenizer class ``TokenizersBackend``, both of which 4.57 misreads)
and then made portable; a tiny random Llama stands in for SmolLM2 (no download).
"""

import json

import pytest
import torch

from clt.data.lm import _load_hf_folder, _rope_theta, hf_to_hooked, make_portable

THETA = 100000.0
VOCAB = ["<bos>", "<eos>", "to", "be", "or", "not", " ", ",", "that", "is", "the", "question"]


def _folder_as_transformers_5_writes_it(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(VOCAB), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    raw = json.loads((folder / "config.json").read_text())
    raw.pop("rope_theta", None)
    raw.pop("rope_scaling", None)
    raw["rope_parameters"] = {"rope_theta": THETA, "rope_type": "default"}
    (folder / "config.json").write_text(json.dumps(raw))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "backend": "tokenizers", "tokenizer_class": "TokenizersBackend", "bos_token": "<bos>",
        "eos_token": "<eos>", "pad_token": "<eos>", "model_max_length": 32}))
    return tok


def test_portable_folder_reads_the_same_in_this_transformers(tmp_path):
    folder = tmp_path / "portable-lm"  # no 'llama' in the path: transformer-lens keys on it
    raw = _folder_as_transformers_5_writes_it(folder)
    make_portable(folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["rope_theta"] == THETA and config["rope_parameters"]["rope_theta"] == THETA
    hf_model, tokenizer = _load_hf_folder(folder)
    assert _rope_theta(hf_model.config) == THETA
    # what the HF model itself rotates with (4.57 reads only the top-level key)
    assert getattr(hf_model.config, "rope_theta", THETA) == THETA
    text = "to be or not to be that is the question"
    ids = tokenizer(text)["input_ids"]
    assert ids == raw.encode(text).ids  # tokenizer.json unchanged, no BOS added
    model = hf_to_hooked(folder, hf_model, tokenizer)
    assert model.cfg.rotary_base == THETA
    tokens = torch.tensor([[0, *ids]])
    with torch.no_grad():
        theirs = hf_model(tokens).logits
        ours = model(tokens)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_make_portable_is_idempotent(tmp_path):
    folder = tmp_path / "portable-lm"
    _folder_as_transformers_5_writes_it(folder)
    make_portable(folder)
    once = {p.name: p.read_text() for p in folder.glob("*.json")}
    make_portable(folder)
    assert once == {p.name: p.read_text() for p in folder.glob("*.json")}
    assert json.loads(once["tokenizer_config.json"])["tokenizer_class"] == \
        "PreTrainedTokenizerFast"


@pytest.mark.parametrize("key", ["rope_theta", "rope_parameters"])
def test_rope_theta_read_from_either_key(tmp_path, key):
    folder = tmp_path / "portable-lm"
    _folder_as_transformers_5_writes_it(folder)
    raw = json.loads((folder / "config.json").read_text())
    raw.pop("rope_parameters")
    raw[key] = THETA if key == "rope_theta" else {"rope_theta": THETA}
    (folder / "config.json").write_text(json.dumps(raw))
    make_portable(folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["rope_theta"] == THETA and config["rope_parameters"]["rope_theta"] == THETA
