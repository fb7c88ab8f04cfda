"""The full-depth presets (configs/full/): all 30 SmolLM2 layers, CLT vs PLT with the same data,
budget and total L0, the activation cache shared between them."""

from pathlib import Path

from clt.config import load_config

FULL = Path(__file__).resolve().parent.parent / "configs" / "full"


def test_full_presets_differ_only_in_reach_and_run_name():
    clt, plt_ = (load_config(FULL / f"{n}.json") for n in ("clt", "plt"))
    assert clt.n_layers == plt_.n_layers == 30
    assert (clt.resolved_reach, plt_.resolved_reach) == (30, 1)
    assert clt.data.lm.cache_dir is not None
    same = plt_.model_copy(update={"model": clt.model, "logging": clt.logging})
    assert same == clt
    assert (clt.logging.run_name, plt_.logging.run_name) == ("full-clt", "full-plt")
