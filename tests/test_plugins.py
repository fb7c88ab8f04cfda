"""The worked plug-in package in ``examples/plugins`` (a nonlinearity, an activation source and a
loss term named by import path) trains through ``train.py``, resumes exactly, evaluates, and
trains under torchrun with tensor parallelism to the single process's weights; its architecture
(tied weights) trains, resumes and evaluates the same way in one process.

``train.main`` and ``clt.evaluate.main`` run in this process (a subprocess would spend ~2 s
importing torch each time); torchrun and the check that the project never imports the plug-ins
need processes of their own."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from clt.evaluate import main as evaluate_main
from clt.losses import LossWeights, compute_losses
from clt.trainer import load_run

ROOT = Path(__file__).resolve().parent.parent
PLUGINS = ROOT / "examples" / "plugins"


def run(*args: str, torchrun: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(PLUGINS), "CLT_FORCE_TORCH": "1",
           "OMP_NUM_THREADS": "1"}
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] \
        if torchrun else []
    return subprocess.run([sys.executable, *launcher, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def make_data(*args: str) -> None:
    """``examples/plugins/make_data.py ARGS`` (it imports nothing of the plug-in package)."""
    runpy.run_path(str(PLUGINS / "make_data.py"))["main"](list(args))


def here(main, *args: str, capsys) -> str:
    """Run a command's ``main`` in this process; its stdout. A failure exits with its line."""
    try:
        main(list(args))
    except SystemExit as exc:
        pytest.fail(f"{main.__module__} exited {exc.code}: {capsys.readouterr().err[-3000:]}")
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> tuple[Path, Path]:
    """(config, runs folder): the example config on freshly written .npy activations."""
    tmp = tmp_path_factory.mktemp("plugins")
    make_data(str(tmp / "data"), "--tokens", "2048")
    cfg = json.loads((PLUGINS / "config.json").read_text())
    cfg["data"]["args"] = {"folder": str(tmp / "data"), "heldout_tokens": 256}
    cfg["data"]["standardize_tokens"] = 512
    # a constant rate after warmup: a 4-step run resumed to 8 then follows the 8-step schedule
    cfg["train"].update(steps=8, warmup_steps=2, batch_tokens=128, decay="constant")
    cfg["eval"].update(every=4, tokens=256)
    cfg["checkpoint"]["every"] = 4
    cfg["loss"]["dead_tokens"] = 128  # a feature silent for one step is dead: AuxK runs
    cfg["logging"]["run_dir"] = str(tmp / "runs")
    config = tmp / "config.json"
    config.write_text(json.dumps(cfg))
    return config, tmp / "runs"


@pytest.fixture(autouse=True)
def plugins_importable(monkeypatch):
    """The plug-in package importable here, and the ops on their torch paths, as in ``run``."""
    monkeypatch.syspath_prepend(str(PLUGINS))
    monkeypatch.setenv("CLT_FORCE_TORCH", "1")


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    _, model, step = load_run(run_dir)
    assert step == 8
    return model.state_dict()


def assert_resume_is_exact(config: Path, runs: Path, whole: str, *sets: str, capsys) -> None:
    """4 steps, then ``--resume`` to 8: the weights of the 8-step run ``whole``, bit for bit."""
    here(train.main, str(config), "--set", f"logging.run_name={whole}-part",
         "--set", "train.steps=4", *sets, capsys=capsys)
    resumed = here(train.main, "--resume", str(runs / f"{whole}-part"), "--set",
                   "train.steps=8", capsys=capsys)
    assert "from step 5" in resumed
    a, b = final_weights(runs / whole), final_weights(runs / f"{whole}-part")
    for key in a:
        assert torch.equal(a[key], b[key]), key


def evaluate(run_dir: Path, capsys) -> str:
    return here(evaluate_main, str(run_dir), "--tokens", "256", capsys=capsys)


def test_the_project_does_not_import_the_plugins():
    code = ("import sys, train, clt.evaluate, clt.export, clt.graph, clt.features; "
            "print(any(m.startswith('my_plugins') for m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(PLUGINS)})
    assert done.stdout.strip() == "False", done.stderr


def test_plugins_train_resume_and_evaluate(example, capsys):
    config, runs = example
    whole = here(train.main, str(config), "--set", "logging.run_name=whole", capsys=capsys)
    assert "my_plugins.nonlinearity:FlooredTopK" in whole
    saved = json.loads((runs / "whole" / "config.json").read_text())
    assert saved["nonlinearity"] == {"kind": "my_plugins.nonlinearity:FlooredTopK", "k": 4,
                                     "rank_by_decoder_norm": False, "floor": 0.05}
    assert saved["data"]["source"] == "my_plugins.source:NpySource"
    metrics = [json.loads(line) for line in (runs / "whole" / "metrics.jsonl").open()]
    assert all("loss/WeightedL1" in m for m in metrics if "loss" in m)
    assert any("loss/auxk" in m for m in metrics if "loss" in m)

    assert_resume_is_exact(config, runs, "whole", capsys=capsys)
    evaluated = evaluate(runs / "whole", capsys)
    assert "FVU total (exported JumpReLU)" in evaluated
    assert "skipped: replacement metrics" in evaluated


TIED = ("--set", "model.architecture=my_plugins.architecture:TiedTranscoder",
        "--set", "model.init_norm=0.5")


def test_plugin_architecture_trains_resumes_and_evaluates(example, capsys):
    config, runs = example
    here(train.main, str(config), "--set", "logging.run_name=tied", *TIED, capsys=capsys)
    saved = json.loads((runs / "tied" / "config.json").read_text())
    assert saved["model"] == {"n_features": 64, "layers": None, "init_norm": 0.5,
                              "architecture": "my_plugins.architecture:TiedTranscoder"}
    _, model, _ = load_run(runs / "tied")
    assert type(model).__name__ == "TiedTranscoderModule"
    assert {name for name, _ in model.named_parameters()} == {"W_enc", "b_enc", "b_dec"}
    metrics = [json.loads(line) for line in (runs / "tied" / "metrics.jsonl").open()]
    fvu = [m["eval/fvu_total"] for m in metrics if "eval/fvu_total" in m]  # steps 4 and 8
    assert fvu[-1] < fvu[0]
    with torch.no_grad():
        model.tokens_since_fired[:, :8] = 10**6  # AuxK: the dead features decode without b_dec
    x, y = torch.randn(2, 3, 32, 16).unbind()
    out = compute_losses(model.train(), x, y, LossWeights(auxk_alpha=1 / 32, dead_tokens=128), 9)
    out.total.backward()
    assert out.terms["auxk"] > 0 and model.W_enc.grad[:, :, :8].abs().sum() > 0

    assert_resume_is_exact(config, runs, "tied", *TIED, capsys=capsys)
    evaluated = evaluate(runs / "tied", capsys)
    assert "FVU total" in evaluated and "exported" not in evaluated  # no decoder rows to export


def test_help_lists_the_plugin_fields_a_command_line_names(example, capsys):
    config, _ = example
    with pytest.raises(SystemExit) as exit_:
        train.main([str(config), "--help", *TIED])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    for field in ("nonlinearity.floor", "data.args.folder", "loss.extra[i].coef",
                  "model.init_norm"):
        assert field in out, field


def refusal(*args: str, capsys) -> str:
    """The one stderr line of a ``train.py`` run that exits 2."""
    with pytest.raises(SystemExit) as exit_:
        train.main(list(args))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.splitlines()) == 1, err
    return err.strip()


def test_plugin_architecture_refusals_are_one_line(example, tmp_path, capsys):
    config, _ = example
    make_data(str(tmp_path / "wide"), "--tokens", "1024", "--d-out", "24")
    cfg = json.loads(config.read_text())
    cfg["data"]["args"]["folder"] = str(tmp_path / "wide")
    wide = tmp_path / "wide.json"
    wide.write_text(json.dumps(cfg))
    assert refusal(str(wide), "--set", "logging.run_name=tied-wide", *TIED, capsys=capsys) == (
        "error: model.architecture my_plugins.architecture:TiedTranscoder: tied weights need "
        "equal input and output widths (got d_in=16, d_out=24)")
    assert refusal(str(config), "--set", "parallel.tensor=2", *TIED, capsys=capsys) == (
        "config error: parallel: a my_plugins.architecture:TiedTranscoder model trains in one "
        "process (tensor and data must be 1)")


def test_plugins_under_tensor_parallelism_match_one_process(example, capsys):
    config, runs = example
    single = runs / "whole"
    if not single.exists():  # under xdist the training test may run in another worker
        here(train.main, str(config), "--set", "logging.run_name=whole", capsys=capsys)
    done = run("train.py", str(config), "--set", "logging.run_name=tp2",
               "--set", "parallel.tensor=2", torchrun=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tensor=2 x data=1" in done.stdout
    a, b = final_weights(single), final_weights(runs / "tp2")
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=2e-5, rtol=1e-4, msg=key)


@pytest.mark.parametrize("override, line", [
    ("nonlinearity.floor=-1", "config error: nonlinearity.floor: must be >= 0 (got -1.0)"),
    ("nonlinearity.flor=1", "config error: nonlinearity.flor: is not an argument of "
                            "my_plugins.nonlinearity:FlooredTopK"),
    ("data.args.folder=/nonexistent", "config error: data.args.folder: cannot be read"),
    ("loss.extra=[{\"kind\": \"my_plugins.loss:Nope\"}]",
     "config error: loss.extra[0].kind: loss term 'my_plugins.loss:Nope': my_plugins.loss has "
     "no 'Nope'"),
])
def test_bad_plugin_arguments_are_one_config_line(example, override, line, capsys):
    config, _ = example
    assert refusal(str(config), "--set", override, capsys=capsys).startswith(line)
