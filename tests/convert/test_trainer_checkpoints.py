"""Conversion on checkpoints the real trainer saves and loads.

- to-hf of `megatron-ext train` checkpoints at (tp, pp) = (2, 1), (1, 2), BLOOM and Llama, and
  (2, 2) Llama (GQA kv heads split over TP, untied head on the last stage):
  transformers' logits equal our model's (< 1e-4), and transformers' loss equals the loss the
  DeepSpeed engine computes on the same samples at the checkpoint's own layout
  (`megatron-ext evaluate`), which shares no conversion code with the export.
- from-hf at tp=2 (BLOOM), pp=2 (Llama) and (2, 2) (BLOOM, tied embedding on both end stages)
  -> `train --reset-progress`: the step-1 loss equals
  transformers' loss on that step's global batch.
- reshard (2, 1) -> (1, 2): the same next-step loss as the original under --reset-progress, and
  the same HF export bit for bit; with --with-optimizer, resuming at the new layout continues
  the original run's losses.
- bad input: exit 2 naming the path, nothing left under the output name.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_ext.cli import main as cli_main
from megatron_ext.config import apply_overrides, from_dict, read_yaml
from megatron_ext.convert.trainer_ckpt import open_checkpoint
from megatron_ext.convert.verify import max_logit_diff
from megatron_ext.models import get_preset
from megatron_ext.training.config import RunConfig
from tests.convert.test_roundtrip import assert_identical, read_all
from tests.models.hf_cases import hf_model
from tests.training.helpers import QUIET, ROOT, TINY, env, losses, run_train

LAYOUTS = [("bloom", 2, 1), ("bloom", 1, 2), ("llama", 1, 2), ("llama", 2, 2)]  # llama tp=2: (2, 2)
STEPS = 3
TOL = 1e-4


def _layout(tp: int, pp: int) -> list[str]:
    return [f"parallel.tp={tp}", f"parallel.pp={pp}"]


@pytest.fixture(scope="module")
def trained(fi_dataset, tmp_path_factory):
    """(family, tp, pp) -> root of a `STEPS`-step training run at that layout (made once)."""
    made = {}

    def get(family: str, tp: int, pp: int):
        if (family, tp, pp) not in made:
            root = tmp_path_factory.mktemp(f"{family}_tp{tp}_pp{pp}") / "ckpt"
            run_train(
                family, fi_dataset, root, f"train.iterations={STEPS}", *_layout(tp, pp),
                nproc=tp * pp, timeout=600,
            )  # fmt: skip
            made[family, tp, pp] = root
        return made[family, tp, pp]

    return get


def run_cfg(family: str, data: str, ckpt, *overrides: str) -> RunConfig:
    """The run config `train` resolves for run_train(family, data, ckpt, *overrides)."""
    cfg = read_yaml(TINY[family])
    apply_overrides(cfg, [f"data.path={data}", f"checkpoint.dir={ckpt}", *QUIET, *overrides])
    return from_dict(RunConfig, cfg)


def hf_loss(model, batches) -> float:
    """Mean over micro-batches of the mean token loss, as the pipeline engine reports it."""
    out = []
    with torch.no_grad():
        for tokens, labels in batches:
            logits = model(tokens).logits.float()
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
            )
            out.append(float(loss))
    return sum(out) / len(out)


def first_train_batches(cfg: RunConfig) -> list:
    """The micro-batches of step 1 (one DP rank holds them all: dp=1 in these runs)."""
    from megatron_ext.training.data import build_run_datasets, micro_batches

    train_ds, _, _ = build_run_datasets(cfg)
    it = micro_batches(train_ds, 0, cfg.train.micro_batch_size, 0, 1)
    return [next(it) for _ in range(cfg.grad_accumulation_steps(1))]


def load_hf(directory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, attn_implementation="eager"
    ).eval()


def evaluate(ckpt, data: str, tp: int, pp: int, num_samples: int = 8) -> dict:
    """`megatron-ext evaluate` at the checkpoint's own layout (the real engine and loader)."""
    cmd = [
        sys.executable, "-m", "megatron_ext", "evaluate", "--checkpoint", str(ckpt),
        "--data-path", data, "--num-samples", str(num_samples), "--micro-batch-size", "4",
        "--tp", str(tp), "--pp", str(pp), "--nproc-per-node", str(tp * pp), "--json",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def eval_batches(data: str, seq_length: int, num_samples: int, seed: int = 1234) -> list:
    """The samples `evaluate` reads (split 1,0,0, the run's seed), in micro-batches of 4."""
    from megatron_ext.data.blend import build_datasets
    from megatron_ext.training.data import micro_batches

    dataset, _, _ = build_datasets(data, seq_length, (num_samples, 0, 0), split="1,0,0", seed=seed)
    it = micro_batches(dataset, 0, 4, 0, 1)
    return [next(it) for _ in range(num_samples // 4)]


@pytest.mark.distributed
@pytest.mark.parametrize(("family", "tp", "pp"), LAYOUTS)
def test_to_hf_of_trainer_checkpoint(trained, fi_dataset, family, tp, pp, tmp_path):
    root, out = trained(family, tp, pp), tmp_path / "hf"
    tokenizer = Path(fi_dataset).parent / "tokenizer"  # the dataset's (vocabulary 1000)
    args = ["convert", "to-hf", "--checkpoint", str(root), "--output", str(out), "--verify"]
    assert cli_main([*args, "--tokenizer", str(tokenizer)]) == 0
    config = json.loads((out / "config.json").read_text())
    arch = {"bloom": "BloomForCausalLM", "llama": "LlamaForCausalLM"}[family]
    assert config["architectures"] == [arch] and config["vocab_size"] == 1000
    assert (out / "tokenizer.json").is_file()
    card = (out / "README.md").read_text()
    assert f"| iterations | {STEPS} |" in card and f"| layout | tp={tp} pp={pp} |" in card
    assert f"| tokens seen | {STEPS * 8 * 64} |" in card and fi_dataset in card

    ckpt = open_checkpoint(root)
    assert (ckpt.tp_size, ckpt.pp_size, ckpt.iteration) == (tp, pp, STEPS)
    assert max_logit_diff(ckpt, out, None) < TOL

    engine = evaluate(root, fi_dataset, tp, pp)
    ours = hf_loss(load_hf(out), eval_batches(fi_dataset, 64, engine["samples"]))
    assert abs(ours - engine["loss"]) < TOL, (ours, engine)


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("family", "tp", "pp"), [("bloom", 2, 1), ("llama", 1, 2), ("bloom", 2, 2)]
)
def test_from_hf_loads_in_the_trainer_with_the_hf_loss(fi_dataset, family, tp, pp, tmp_path):
    config = get_preset({"bloom": "tiny", "llama": "tiny-llama"}[family]).replace(seq_length=64)
    model = hf_model(config, seed=7)
    hf_dir, ckpt, run = tmp_path / "hf", tmp_path / "ckpt", tmp_path / "run"
    model.save_pretrained(hf_dir)
    args = ["convert", "from-hf", "--hf-dir", str(hf_dir), "--output", str(ckpt)]
    assert cli_main([*args, "--tp", str(tp), "--pp", str(pp)]) == 0
    overrides = ["train.iterations=1", f"checkpoint.load={ckpt}", *_layout(tp, pp)]
    proc = run_train(family, fi_dataset, run, *overrides, "--reset-progress", nproc=tp * pp)
    assert "loaded checkpoint" in proc.stderr + proc.stdout
    expected = hf_loss(model, first_train_batches(run_cfg(family, fi_dataset, run, *overrides)))
    assert abs(losses(run)[1] - expected) < TOL, (losses(run), expected)


@pytest.mark.distributed
def test_reshard_keeps_the_next_step_loss(trained, fi_dataset, tmp_path):
    root = trained("bloom", 2, 1)
    out = tmp_path / "resharded"
    args = ["convert", "reshard", "--checkpoint", str(root), "--output", str(out)]
    assert cli_main([*args, "--tp", "1", "--pp", "2"]) == 0
    assert sorted(p.name for p in (out / "iter_0000000").glob("layer_00-*")) == [
        "layer_00-model_00-model_states.pt"
    ]
    # the same weights: both export to identical HF tensors
    assert (
        cli_main(["convert", "to-hf", "--checkpoint", str(root), "--output", str(tmp_path / "a")])
        == 0
    )
    assert (
        cli_main(["convert", "to-hf", "--checkpoint", str(out), "--output", str(tmp_path / "b")])
        == 0
    )
    assert_identical(read_all(tmp_path / "a"), read_all(tmp_path / "b"))
    # and the same next-step loss under --reset-progress, each at its own layout
    step = {}
    for name, load, (tp, pp) in (("orig", root, (2, 1)), ("new", out, (1, 2))):
        run = tmp_path / f"run_{name}"
        overrides = ["train.iterations=1", f"checkpoint.load={load}", *_layout(tp, pp)]
        run_train("bloom", fi_dataset, run, *overrides, "--reset-progress", nproc=tp * pp)
        step[name] = losses(run)[1]
    assert abs(step["orig"] - step["new"]) < 1e-5, step


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("family", "before", "after"), [("bloom", (2, 1), (1, 2)), ("llama", (1, 2), (2, 1))]
)
def test_reshard_with_optimizer_resumes_the_same_run(trained, fi_dataset, family, before, after,
                                                     tmp_path):  # fmt: skip
    """Weights, Adam moments and schedule at the new layout: resuming there gives the losses
    of the original run continued at its own layout (steps after the checkpoint)."""
    root = trained(family, *before)
    out = tmp_path / "resharded"
    args = ["convert", "reshard", "--checkpoint", str(root), "--output", str(out)]
    assert cli_main([*args, "--tp", str(after[0]), "--pp", str(after[1]), "--with-optimizer"]) == 0
    tag = out / f"iter_{STEPS:07d}"
    assert len(list(tag.glob("zero_pp_rank_*_optim_states.pt"))) == after[0] * after[1]
    assert not list(tmp_path.glob(".resharded*"))  # the work directory is gone
    got = {}
    for name, src, (tp, pp) in (("orig", root, before), ("new", out, after)):
        run = tmp_path / f"run_{name}"
        shutil.copytree(src, run)
        run_train(family, fi_dataset, run, f"train.iterations={STEPS + 2}", *_layout(tp, pp),
                  nproc=tp * pp)  # fmt: skip
        got[name] = losses(run)
    for step in (STEPS + 1, STEPS + 2):
        assert got["new"][step] == pytest.approx(got["orig"][step], abs=1e-5), (step, got)


# --- bad input: exit 2 naming the path, no output left ------------------------------------


@pytest.fixture
def small_ckpt(tmp_path):
    """A checkpoint root in the trainer's layout (from-hf of a tiny random BLOOM, tp=2)."""
    hf_dir, root = tmp_path / "hf", tmp_path / "ckpt"
    hf_model(get_preset("tiny").replace(seq_length=64), seed=1).save_pretrained(hf_dir)
    assert (
        cli_main(
            ["convert", "from-hf", "--hf-dir", str(hf_dir), "--output", str(root), "--tp", "2"]
        )
        == 0
    )
    return root


def refresh_manifest(tag_dir) -> None:
    files = {p.name: p.stat().st_size for p in tag_dir.iterdir() if p.name != "manifest.json"}
    (tag_dir / "manifest.json").write_text(json.dumps({"files": files}))


def _fails(capsys, argv: list[str], *needles: str) -> None:
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err


def test_bad_trainer_checkpoints_exit_2_naming_the_path(small_ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    to_hf = ["convert", "to-hf", "--checkpoint", str(small_ckpt), "--output", str(out)]
    _fails(capsys, [*to_hf, "--iteration", "7"], str(small_ckpt / "iter_0000007"), "iter_0000000")
    (small_ckpt / "latest").unlink()
    _fails(capsys, to_hf, str(small_ckpt / "latest"), "--iteration")
    assert cli_main([*to_hf, "--iteration", "0"]) == 0  # the explicit iteration still works
    shutil.rmtree(out)
    config = small_ckpt / "iter_0000000" / "config.yaml"
    good = config.read_text()
    config.write_text("model: [unclosed\n")  # after the manifest was written: size differs
    _fails(capsys, [*to_hf, "--iteration", "0"], str(config), "manifest")
    refresh_manifest(config.parent)  # corrupt when saved: the YAML itself is refused
    _fails(capsys, [*to_hf, "--iteration", "0"], str(config), "invalid YAML")
    config.write_text("parallel: {tp: 2}\n")
    refresh_manifest(config.parent)
    _fails(capsys, [*to_hf, "--iteration", "0"], str(config), "no `model:` section")
    config.write_text(good)
    refresh_manifest(config.parent)
    (small_ckpt / "iter_0000000" / "layer_01-model_01-model_states.pt").unlink()
    reshard = ["convert", "reshard", "--checkpoint", str(small_ckpt), "--iteration", "0"]
    _fails(capsys, [*reshard, "--output", str(out), "--tp", "1", "--pp", "1"], "layer_01-model_01")
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_from_hf_tp_shards_hold_only_their_rows(small_ckpt):
    """torch.save writes a view's whole storage: each rank's file must hold its own rows only
    (tiny: 1024 padded rows x 64 fp32, 512 per rank)."""
    for rank in (0, 1):
        size = (small_ckpt / "iter_0000000" / f"layer_00-model_0{rank}-model_states.pt").stat()
        assert 512 * 64 * 4 < size.st_size < 1.1 * 512 * 64 * 4


def test_from_hf_refuses_a_layout_the_model_cannot_take(small_ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    from_hf = ["convert", "from-hf", "--hf-dir", str(tmp_path / "hf"), "--output", str(out)]
    _fails(capsys, [*from_hf, "--tp", "3"], "num_attention_heads 4", "tp=3")
    _fails(capsys, [*from_hf, "--pp", "5"], "pp=5")
    _fails(capsys, ["convert", "from-hf", "--hf-dir", str(tmp_path), "--output", str(out)],
           str(tmp_path / "config.json"))  # fmt: skip
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_loading_at_another_tp_names_the_reshard_command(small_ckpt, fi_dataset, tmp_path):
    run = tmp_path / "run"
    overrides = ["train.iterations=1", f"checkpoint.load={small_ckpt}", "model.vocab_size=1000"]
    proc = run_train("bloom", fi_dataset, run, *overrides, "--reset-progress", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "saved at tp=2, this run has tp=1" in proc.stderr
    assert f"convert reshard --checkpoint {small_ckpt}" in proc.stderr
    assert not (run / "metrics.jsonl").exists()
