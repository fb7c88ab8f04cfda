"""circuit-tracer next to this project: load our exports with its loaders, hand it our LM.

    from clt.tracer import load_transcoders, replacement_model
    transcoders = load_transcoders("out/")                  # a clt.export folder
    model = replacement_model(load_lm("smollm2-135m"), transcoders)
    graph = circuit_tracer.attribute(tokens, model)

Needs circuit-tracer (0.5.0, installed with constraints-circuit-tracer.txt; see the README's "One
environment with circuit-tracer"); nothing else in ``clt`` imports this module. circuit-tracer
builds its replacement model with ``HookedTransformer.from_pretrained``, which refuses names
transformer-lens does not list (the embedded SmolLM2 among them): :func:`replacement_model`
builds it from the config of a ``HookedTransformer`` we loaded and copies that model's weights in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml


def load_transcoders(
    export_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Any:
    """circuit-tracer's transcoder object of a ``clt.export`` folder, read by its own loaders:
    ``load_clt`` for ``model_kind: cross_layer_transcoder``, ``load_transcoder_set`` (one
    ``layer_{i}.safetensors`` per layer) for ``transcoder_set``. Weights are read eagerly (no
    lazy encoder/decoder) in ``dtype`` (``load_clt`` would default to bfloat16)."""
    # deferred: circuit-tracer is optional (not a project dependency)
    from circuit_tracer.transcoder.cross_layer_transcoder import load_clt
    from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set

    folder = Path(export_dir)
    config = yaml.safe_load((folder / "config.yaml").read_text())
    hooks = {"feature_input_hook": config["feature_input_hook"],
             "feature_output_hook": config["feature_output_hook"]}
    device = torch.device(device)
    if config["model_kind"] == "cross_layer_transcoder":
        return load_clt(str(folder), device=device, dtype=dtype, lazy_encoder=False,
                        lazy_decoder=False, **hooks)
    if config["model_kind"] == "transcoder_set":
        paths = {i: str(folder / f"layer_{i}.safetensors")
                 for i in range(len(list(folder.glob("layer_*.safetensors"))))}
        return load_transcoder_set(paths, scan=str(folder), device=device, dtype=dtype,
                                   lazy_encoder=False, lazy_decoder=False, **hooks)
    raise ValueError(f"{folder}: unknown model_kind {config['model_kind']!r}")


def replacement_model(lm, transcoders: Any) -> Any:
    """circuit-tracer's ``TransformerLensReplacementModel`` of our ``HookedTransformer`` ``lm``
    (e.g. ``clt.data.lm.load_lm("smollm2-135m")``) with ``transcoders`` spliced in.

    Built with its ``from_config`` (which wraps each block's MLP and the unembedding), then
    ``lm``'s weights and buffers are copied in under the wrapped names; every weight of the LM
    must land somewhere, or ValueError.
    """
    # deferred: circuit-tracer is optional (not a project dependency)
    from circuit_tracer.replacement_model.replacement_model_transformerlens import (
        TransformerLensReplacementModel,
    )

    model = TransformerLensReplacementModel.from_config(lm.cfg, transcoders,
                                                        tokenizer=lm.tokenizer)
    wrapped = set(model.state_dict())
    state = {}
    for key, value in lm.state_dict().items():
        parts = key.split(".")
        if parts[0] == "blocks" and parts[2] == "mlp":
            parts.insert(3, "old_mlp")
        elif parts[0] == "unembed":
            parts.insert(1, "old_unembed")
        name = ".".join(parts)
        if name not in wrapped:
            raise ValueError(f"circuit-tracer's model has no {name!r} (for the LM's {key!r})")
        state[name] = value
    missing, _ = model.load_state_dict(state, strict=False)
    left = [k for k in missing if not k.startswith("transcoders.")]
    if left:
        raise ValueError(f"LM weights missing from circuit-tracer's model: {left[:5]}")
    model.eval()
    return model
