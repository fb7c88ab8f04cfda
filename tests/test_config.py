import json
from pathlib import Path

import pytest

from clt.config import (
    Config,
    ConfigError,
    config_help,
    load_config,
    main_config,
    parse_override,
    save_config,
)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
PRESETS = sorted(CONFIGS.glob("**/*.json"))

# Small valid config on the default LM (smollm2-135m, 30 layers), training 4 of its layers.
BASE = {
    "model": {"n_features": 64, "layers": [0, 1, 2, 3]},
    "nonlinearity": {"kind": "topk", "k": 4},
    "train": {"steps": 100, "batch_tokens": 256},
}


@pytest.fixture
def base_file(tmp_path: Path) -> Path:
    path = tmp_path / "base.json"
    path.write_text(json.dumps(BASE))
    return path


def test_presets_exist():
    assert {str(p.relative_to(CONFIGS)) for p in PRESETS} >= {
        "topk-clt.json",
        "batchtopk-clt.json",
        "jumprelu-clt.json",
        "jumprelu-plt.json",
        "topk-plt.json",
        "relu-plt.json",
        "sae.json",
        "gpt2/topk-clt.json",
        "gpt2/batchtopk-clt.json",
        "gpt2/jumprelu-clt.json",
        "compare/clt.json",
        "compare/plt.json",
    }


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_preset_loads_and_round_trips(preset: Path, tmp_path: Path):
    cfg = load_config(preset)
    # embedded presets: SmolLM2 layers 0-7 (full/: all 30); GPT-2 presets: all 12 layers
    assert cfg.n_layers == {"gpt2": 12, "full": 30}.get(preset.parent.name, 8)
    saved = tmp_path / "saved.json"
    save_config(cfg, saved)
    assert load_config(saved) == cfg


def test_compare_presets_differ_only_in_reach():
    """Same model, data, budget and k (so the same total L0): only the decoder reach differs."""
    clt, plt_ = (load_config(CONFIGS / "compare" / f"{n}.json") for n in ("clt", "plt"))
    assert (clt.resolved_reach, plt_.resolved_reach) == (8, 1)
    assert plt_.model_copy(update={"model": clt.model}) == clt


def test_preset_reaches():
    assert load_config(CONFIGS / "topk-clt.json").resolved_reach == 8
    for plt_ in ("relu-plt", "topk-plt", "jumprelu-plt", "sae"):
        assert load_config(CONFIGS / f"{plt_}.json").resolved_reach == 1
    assert load_config(CONFIGS / "sae.json").is_sae


@pytest.mark.parametrize(
    "text, path, value",
    [
        ("train.steps=10", ["train", "steps"], 10),
        ("train.lr=3e-4", ["train", "lr"], 3e-4),
        ("nonlinearity.rank_by_decoder_norm=true", ["nonlinearity", "rank_by_decoder_norm"], True),
        ("model.reach=null", ["model", "reach"], None),
        ("model.layers=[0,2]", ["model", "layers"], [0, 2]),
        ("data.lm.name=gpt2", ["data", "lm", "name"], "gpt2"),
        ('logging.run_name="123"', ["logging", "run_name"], "123"),
        ("train.betas=[0.9, 0.95]", ["train", "betas"], [0.9, 0.95]),
        ('data.lm={"name": "tiny"}', ["data", "lm"], {"name": "tiny"}),
        ("logging.run_dir=a=b", ["logging", "run_dir"], "a=b"),
    ],
    ids=[
        "int",
        "float",
        "bool",
        "null",
        "list",
        "nested-string",
        "quoted-string",
        "pair",
        "object",
        "equals-in-value",
    ],
)
def test_parse_override(text: str, path: list[str], value: object):
    assert parse_override(text) == (path, value)


@pytest.mark.parametrize("text", ["train.steps", "=3", "train..steps=3", "train.=3"])
def test_parse_override_rejects_malformed(text: str):
    with pytest.raises(ConfigError, match="override"):
        parse_override(text)


@pytest.mark.parametrize(
    "override, get, value",
    [
        ("train.steps=10", lambda c: c.train.steps, 10),
        ("train.lr=0.01", lambda c: c.train.lr, 0.01),
        (
            "nonlinearity.rank_by_decoder_norm=true",
            lambda c: c.nonlinearity.rank_by_decoder_norm,
            True,
        ),
        ("model.layers=null", lambda c: c.model.layers, None),
        ("model.layers=[3,7]", lambda c: c.model.layers, [3, 7]),
        ("data.lm.name=gpt2", lambda c: c.data.lm.name, "gpt2"),
        ("logging.run_name=trial", lambda c: c.logging.run_name, "trial"),
        ("train.grad_clip=null", lambda c: c.train.grad_clip, None),
        ("train.betas=[0.8,0.9]", lambda c: c.train.betas, (0.8, 0.9)),
    ],
    ids=["int", "float", "bool", "null", "list", "nested", "string", "optional", "tuple"],
)
def test_override_is_applied_and_typed(base_file: Path, override: str, get, value):
    got = get(load_config(base_file, [override]))
    assert got == value
    assert type(got) is type(value)


def test_overrides_apply_in_order_and_create_sections(base_file: Path):
    cfg = load_config(
        base_file,
        [
            "train.steps=10",
            "train.steps=20",
            "data.source=synthetic",
            "data.synthetic.n_layers=4",
            "data.synthetic.d_in=8",
            "data.synthetic.d_out=8",
        ],
    )
    assert cfg.train.steps == 20
    assert cfg.data.synthetic is not None and cfg.data.synthetic.d_in == 8


def test_override_through_a_value_names_it(base_file: Path):
    with pytest.raises(ConfigError, match=r"train\.steps: is not a section"):
        load_config(base_file, ["train.steps.x=1"])


BAD = [
    ("unknown-section", ["bogus.x=1"], "bogus"),
    ("unknown-field", ["model.n_feature=3"], "model.n_feature"),
    ("wrong-type", ['model.n_features="many"'], "model.n_features"),
    ("bool-as-int", ["model.n_features=true"], "model.n_features"),
    ("negative-n_features", ["model.n_features=-3"], "model.n_features"),
    ("k-over-n_features", ["nonlinearity.k=65"], "nonlinearity.k"),
    ("k-missing-topk", ["nonlinearity.k=null"], "nonlinearity.k"),
    ("k-given-relu", ["nonlinearity.kind=relu"], "nonlinearity.k"),
    ("auxk_k-over-n_features", ["loss.auxk_k=128"], "loss.auxk_k"),
    ("reach-0", ["model.reach=0"], "model.reach"),
    ("reach-over-L", ["model.reach=5"], "model.reach"),
    ("reach-over-all-layers", ["model.layers=null", "model.reach=31"], "model.reach"),
    ("layer-30-smollm2", ["model.layers=[0,30]"], "model.layers"),
    ("layer-12-gpt2", ["data.lm.name=gpt2", "model.layers=[12]"], "model.layers"),
    ("negative-layer", ["model.layers=[-1,0]"], "model.layers[0]"),
    ("duplicate-layers", ["model.layers=[1,1,2]"], "model.layers"),
    ("empty-layers", ["model.layers=[]"], "model.layers"),
    ("sae-reach-2", ["data.lm.output_hook=hook_mlp_in", "model.reach=2"], "model.reach"),
    ("sae-clt", ["data.lm.output_hook=hook_mlp_in"], "model.reach"),
    ("batch-not-divisible", ["train.grad_accum=3"], "train.batch_tokens"),
    ("batch-not-divisible-dp", ["parallel.data=3"], "train.batch_tokens"),
    ("features-not-divisible-tp", ["parallel.tensor=3"], "model.n_features"),
    ("warmup-equals-steps", ["train.warmup_steps=100"], "train.warmup_steps"),
    (
        "sparsity-warmup-over-steps",
        ["loss.sparsity_warmup_steps=101"],
        "loss.sparsity_warmup_steps",
    ),
    ("synthetic-without-section", ["data.source=synthetic"], "data.synthetic"),
    (
        "synthetic-layers-out-of-range",
        ["data.source=synthetic", 'data.synthetic={"n_layers": 3, "d_in": 4, "d_out": 4}'],
        "model.layers",
    ),
    (
        "synthetic-too-active",
        ['data.synthetic={"n_layers": 3, "d_in": 4, "d_out": 4, "n_true_features": 2}'],
        "data.synthetic.active_per_layer",
    ),
    ("bad-wandb-mode", ["logging.wandb_mode=sometimes"], "logging.wandb_mode"),
    ("ema-decay-1", ["nonlinearity.threshold_ema_decay=1.0"], "nonlinearity.threshold_ema_decay"),
    ("beta-1", ["train.betas=[0.9,1.0]"], "train.betas[1]"),
    ("heldout-half", ["data.lm.heldout_fraction=0.5"], "data.lm.heldout_fraction"),
    ("missing-required", ['train={"lr": 0.1}'], "train.steps"),
    ("matryoshka-not-ending-at-1", ["model.matryoshka_prefixes=[0.25,0.5]"],
     "model.matryoshka_prefixes"),
    ("matryoshka-decreasing", ["model.matryoshka_prefixes=[0.5,0.25,1]"],
     "model.matryoshka_prefixes"),
    ("matryoshka-fractional-features", ["model.matryoshka_prefixes=[0.3,1]"],
     "model.matryoshka_prefixes"),
    ("matryoshka-weights-count", ["model.matryoshka_prefixes=[0.5,1]",
                                  "loss.matryoshka_weights=[1,1,1]"], "loss.matryoshka_weights"),
    ("matryoshka-weights-alone", ["loss.matryoshka_weights=[1]"], "loss.matryoshka_weights"),
    ("molt-without-groups", ["model.architecture=molt", "model.reach=1"],
     "model.molt_rank_groups"),
    ("molt-count-mismatch", ["model.architecture=molt", "model.molt_rank_groups=[[8,4]]"],
     "model.n_features"),
    ("molt-bad-group", ["model.architecture=molt", "model.molt_rank_groups=[[8]]"],
     "model.molt_rank_groups"),
    ("molt-skip", ["model.architecture=molt", "model.molt_rank_groups=[[8,64]]",
                   "model.skip=true"], "model.skip"),
    ("molt-tensor-parallel", ["model.architecture=molt", "model.molt_rank_groups=[[8,64]]",
                              "parallel.tensor=2"], "parallel"),
    ("groups-without-molt", ["model.molt_rank_groups=[[8,64]]"], "model.molt_rank_groups"),
    ("fp16-parallel", ["train.mixed_precision=fp16", "parallel.tensor=2"],
     "train.mixed_precision"),
    ("batch-not-divisible-tp", ["parallel.tensor=16", "model.n_features=1024",
                                "train.batch_tokens=24"], "train.batch_tokens"),
]


@pytest.mark.parametrize("overrides, field", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_config_names_field(base_file: Path, overrides: list[str], field: str):
    with pytest.raises(ConfigError) as info:
        load_config(base_file, overrides)
    # The error line must start with the exact path, so "model.n_feature" is not "...n_features".
    assert any(line.startswith(f"{field}:") for line in str(info.value).splitlines())


PLUGIN_FILES = {  # module -> source of a plug-in package's module, each wrong in one way
    "plug_raises": "import math\nmath.sqrt(-1)\n",
    "plug_syntax": "def broken(:\n",
    "plug_missing_dep": "import not_installed_anywhere\n",
    "plug_not_a_component": "class TopK:\n    pass\n",
}


@pytest.mark.parametrize("kind, message", [
    ("topq", "nonlinearity.kind: unknown nonlinearity 'topq': one of ['topk', 'batchtopk', "
             "'jumprelu', 'relu'] or an import path 'package.module:Class'"),
    ("plug_raises:TopK", "nonlinearity.kind: nonlinearity 'plug_raises:TopK': importing "
                         "plug_raises failed: ValueError: math domain error "
                         "({dir}/plug_raises.py:2)"),
    ("plug_syntax:TopK", "nonlinearity.kind: nonlinearity 'plug_syntax:TopK': importing "
                         "plug_syntax failed: SyntaxError: "),
    ("plug_missing_dep:TopK", "nonlinearity.kind: nonlinearity 'plug_missing_dep:TopK': cannot "
                              "import plug_missing_dep (No module named "
                              "'not_installed_anywhere'); "),
    ("plug_not_a_component:TopK", "nonlinearity.kind: nonlinearity 'plug_not_a_component:TopK' is "
                                  "not a dataclass subclass of clt.nonlinearities.Nonlinearity"),
    ("plug_not_a_component:Nope", "nonlinearity.kind: nonlinearity 'plug_not_a_component:Nope': "
                                  "plug_not_a_component has no 'Nope'"),
    ("a.b.C", "nonlinearity.kind: unknown nonlinearity 'a.b.C'"),
])
def test_a_plugin_that_does_not_load_is_one_line(base_file, tmp_path, monkeypatch, kind, message):
    """Whatever is wrong with a plug-in's module, the config error is one line that says what and
    where (a module's own exception: its type, message and the line that raised it)."""
    for name, source in PLUGIN_FILES.items():
        (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError) as info:
        load_config(base_file, [f"nonlinearity.kind={kind}"])
    assert len(str(info.value).splitlines()) == 1, str(info.value)
    assert str(info.value).startswith(message.format(dir=tmp_path)), str(info.value)


def test_error_shows_reason_and_value(base_file: Path):
    with pytest.raises(ConfigError) as info:
        load_config(base_file, ["model.n_features=-3"])
    assert str(info.value) == "model.n_features: Input should be greater than 0 (got -3)"


def test_several_errors_one_line_each(base_file: Path):
    with pytest.raises(ConfigError) as info:
        load_config(base_file, ["train.grad_accum=3", "train.warmup_steps=100"])
    lines = str(info.value).splitlines()
    assert [line.split(":")[0] for line in lines] == ["train.batch_tokens", "train.warmup_steps"]


@pytest.mark.parametrize(
    "overrides, n_layers, reach",
    [
        ([], 4, 4),
        (["model.reach=2"], 4, 2),
        (["model.layers=null"], 30, 30),
        (["model.layers=null", "data.lm.name=gpt2"], 12, 12),
        (["model.layers=null", "data.lm.name=tiny", "data.lm.tiny_n_layers=3"], 3, 3),
        (["model.layers=null", "data.lm.name=some/unknown-lm"], None, None),
        (["model.layers=[40,50]", "data.lm.name=some/unknown-lm"], 2, 2),
        (
            [
                "model.layers=null",
                "data.source=synthetic",
                'data.synthetic={"n_layers": 5, "d_in": 4, "d_out": 4}',
            ],
            5,
            5,
        ),
    ],
    ids=[
        "layers",
        "reach",
        "all-smollm2",
        "gpt2",
        "tiny",
        "unknown-lm",
        "unknown-lm-layers",
        "synthetic",
    ],
)
def test_layer_count_and_reach(base_file: Path, overrides: list[str], n_layers, reach):
    cfg = load_config(base_file, overrides)
    assert (cfg.n_layers, cfg.resolved_reach) == (n_layers, reach)


def test_defaults():
    cfg = Config.model_validate(BASE)
    assert cfg.data.source == "lm" and cfg.data.lm.name == "smollm2-135m"
    assert cfg.loss.auxk_alpha == 1 / 32 and cfg.train.betas == (0.9, 0.999)
    assert cfg.logging.wandb_mode == "offline"


def test_missing_file_names_it(tmp_path: Path):
    path = tmp_path / "nope.json"
    with pytest.raises(ConfigError, match="nope.json"):
        load_config(path)


def test_invalid_json_names_file_and_position(tmp_path: Path):
    path = tmp_path / "broken.json"
    path.write_text('{\n  "model": {"n_features": 8,}\n}\n')
    with pytest.raises(ConfigError, match=r"broken\.json: invalid JSON at line 2, column"):
        load_config(path)


def test_non_object_json_is_rejected(tmp_path: Path):
    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        load_config(path)


def _cli_error(capsys, argv: list[str]) -> list[str]:
    with pytest.raises(SystemExit) as info:
        main_config(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("config error:")]


def test_cli_bad_override(capsys, base_file: Path):
    lines = _cli_error(capsys, [str(base_file), "--set", "model.n_features=-3"])
    assert len(lines) == 1 and "model.n_features" in lines[0]


def test_cli_unknown_field(capsys, base_file: Path):
    lines = _cli_error(capsys, [str(base_file), "--set", "model.n_feature=3"])
    assert len(lines) == 1 and "model.n_feature" in lines[0]


def test_cli_bad_file(capsys, tmp_path: Path):
    lines = _cli_error(capsys, [str(tmp_path / "missing.json")])
    assert len(lines) == 1 and "missing.json" in lines[0]


def test_cli_ok(base_file: Path):
    cfg, args = main_config(
        [str(base_file), "--set", "train.steps=7", "--set", "model.reach=1", "--resume", "runs/x"]
    )
    assert cfg.train.steps == 7 and cfg.model.reach == 1
    assert args.resume == "runs/x" and args.config == str(base_file)


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as info:
        main_config(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "model.n_features" in out and "--set" in out and "--resume" in out


def test_config_help_lists_every_field():
    text = config_help()
    for path in [
        "model.n_features",
        "nonlinearity.k",
        "data.lm.name",
        "data.synthetic.d_in",
        "train.betas",
        "checkpoint.keep_last",
    ]:
        assert f"  {path}  (" in text
    assert "required" in text and 'default "offline"' in text
