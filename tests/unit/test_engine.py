"""The training engine's parts: schedule, optimizer groups, data stream, checkpoints, and the loop's
mechanics on a small linear-regression phase (fast; the detector runs in test_train_teacher*.py)."""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from slsd_cli.distributed import DistInfo
from slsd_cli.engine import checkpoint as ckpt
from slsd_cli.engine.optim import build_optimizer, lr_factor, param_groups, set_lr
from slsd_cli.engine.seeding import sample_seed, seed_everything
from slsd_cli.engine.stream import StepLoader, _RankKeys
from slsd_cli.engine.trainer import NonFiniteLossError, train
from slsd_cli.errors import InputError
from slsd_cli.io import load_torch_file, torch_save_atomic
from slsd_cli.recipe import Recipe, TrainConfig, load, packaged_recipes, resolve_path
from tests.helpers.paths import REPO

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


# ------------------------------------------------------------------------------ schedule


def test_cosine_with_linear_warmup():
    total, warm = 100, 10
    f = [lr_factor(t, total, "cosine", warm, 0.001) for t in range(total)]
    assert f[0] == pytest.approx(0.001)
    # linear warm-up times the cosine
    for t in range(warm):
        alpha = t / warm
        assert f[t] == pytest.approx((0.001 * (1 - alpha) + alpha) * 0.5 * (1 + math.cos(math.pi * t / total)))
    assert f[warm] == pytest.approx(0.5 * (1 + math.cos(math.pi * warm / total)))
    assert all(a > b for a, b in zip(f[warm:], f[warm + 1:]))  # decreasing after warm-up
    assert lr_factor(total, total) == pytest.approx(0.0)
    assert lr_factor(total, total, min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(50, 100, "constant") == 1.0


def test_layer_decay_groups_on_a_vit_detector():
    from slsd_cli.model.model_config import tiny_eva_config
    from slsd_cli.model.weights import build_detector

    cfg = tiny_eva_config()
    model = build_detector(cfg, [{"id": i + 1, "name": f"c{i}", "image_count": 5} for i in range(3)])
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1, layer_decay=0.8)
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    depth = cfg.vit_depth
    names = dict(model.named_parameters())
    block0 = names["backbone.trunk.blocks.0.attn.qkv.weight"] if "backbone.trunk.blocks.0.attn.qkv.weight" in names \
        else next(p for n, p in names.items() if n.startswith("backbone.trunk.blocks.0.") and p.ndim == 2)
    last = next(p for n, p in names.items() if n.startswith(f"backbone.trunk.blocks.{depth - 1}.") and p.ndim == 2)
    head = next(p for n, p in names.items() if n.startswith("roi_heads.") and p.ndim == 2)
    pos = next((p for n, p in names.items() if n.endswith("pos_embed")), None)
    assert by_param[id(head)]["lr_scale"] == pytest.approx(1.0)
    assert by_param[id(last)]["lr_scale"] == pytest.approx(0.8)            # layer id L -> decay^1
    assert by_param[id(block0)]["lr_scale"] == pytest.approx(0.8 ** depth)   # layer id 1 -> decay^L
    assert by_param[id(head)]["weight_decay"] == pytest.approx(0.1)
    if pos is not None:
        assert by_param[id(pos)]["weight_decay"] == 0.0
        assert by_param[id(pos)]["lr_scale"] == pytest.approx(0.8 ** (depth + 1))
    set_lr(opt, 0.5)
    assert by_param[id(block0)]["lr"] == pytest.approx(1e-3 * 0.5 * 0.8 ** depth)
    # every trainable parameter is in exactly one group
    assert sum(len(g["params"]) for g in opt.param_groups) == sum(1 for p in model.parameters() if p.requires_grad)


def test_one_weight_decay_rule_norm_layers_and_position_embeddings_are_exempt():
    """ViTDet's rule for every model: norm layers and `pos_embed` do not decay; biases do."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos_embed = nn.Parameter(torch.zeros(1, 4))
            self.fc, self.norm, self.bn = nn.Linear(3, 4), nn.LayerNorm(4), nn.BatchNorm1d(4)

    model = Net()
    groups = param_groups(model, weight_decay=0.1, layer_decay=1.0)
    decay = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decay == {id(model.fc.weight), id(model.fc.bias)}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


# ------------------------------------------------------------------------------ data stream


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_stream_is_world_size_independent_and_resumable():
    factors = [1.0, 2.5, 1.0, 4.0, 1.2]
    first = [index for index, _ in _take(iter(_RankKeys(5, factors, 3, 0, 1, start=0)), 240)]
    # 2 or 3 processes interleave the same global stream, and know each sample's global position
    for world in (2, 3):
        shards = [iter(_RankKeys(5, factors, 3, r, world, start=0)) for r in range(world)]
        merged = []
        for _ in range(240 // world):
            for shard in shards:
                index, position = next(shard)
                assert position == len(merged)
                merged.append(index)
        assert merged == first
    # starting at a later local position continues the same stream
    assert next(iter(_RankKeys(5, factors, 3, 1, 2, start=7))) == (first[15], 15)
    # repeat factors: index 3 (factor 4) is drawn about 4x as often as index 0 (factor 1)
    counts = np.bincount([i for i, _ in _take(iter(_RankKeys(5, factors, 3, 0, 1, start=0)), 4000)], minlength=5)
    assert 3.3 < counts[3] / counts[0] < 4.7


def test_uniform_stream_visits_each_index_once_per_epoch():
    keys = _take(iter(_RankKeys(7, None, 0, 0, 1, start=0)), 14)
    assert sorted(i for i, _ in keys[:7]) == list(range(7)) == sorted(i for i, _ in keys[7:])


class _Numbers(torch.utils.data.Dataset):
    """Sample i = (i, a random draw): shows both the order and the per-sample seeding."""

    def __len__(self):
        return 6

    def __getitem__(self, i):
        return torch.tensor([float(i), float(torch.rand(()))])


def test_step_loader_resumes_exactly_and_seeds_per_sample():
    def run(start_state=None, n=6, world=1, rank=0, micro=2):
        loader = StepLoader(_Numbers(), torch.stack, seed=1, rank=rank, world_size=world, micro_batch=micro)
        if start_state is not None:
            loader.load_state_dict(start_state)
        return [loader.next() for _ in range(n)], loader

    straight, _ = run()
    first, loader = run(n=3)
    assert loader.state_dict() == {"consumed": 6}
    rest, _ = run(start_state=loader.state_dict(), n=3)
    assert all(torch.equal(a, b) for a, b in zip(straight, first + rest))
    # the same sample at the same stream position gets the same augmentation in 2 processes
    r0, _ = run(world=2, rank=0, micro=1, n=3)
    r1, _ = run(world=2, rank=1, micro=1, n=3)
    single = torch.cat(straight)[:6]
    interleaved = torch.cat([torch.cat([a, b]) for a, b in zip(r0, r1)])
    assert torch.equal(single, interleaved)


def test_sample_seed_is_pinned_distinct_and_refuses_folded_seeds():
    # pinned values: a change of the derivation would silently change every run of a given seed
    assert sample_seed(0, 1, 2) == 8340944691342176559
    assert sample_seed(7, 3, 1000) == 3471022234184632218
    assert sample_seed(2**32 - 1, 2, 5) == 8617360527565985086
    seeds = {sample_seed(s, k, p) for s in (0, 1, 2**31) for k in (1, 2, 3) for p in (0, 1, 2**31)}
    assert len(seeds) == 27 and all(0 <= x < 2**63 for x in seeds)
    # 2**32 would be split into two words and equal seed 0 followed by key 1: refused
    for bad in ((2**32, 5), (-1, 5), (0, 2**32)):
        with pytest.raises(ValueError):
            sample_seed(*bad)
    with pytest.raises(InputError, match="train.seed"):
        load("synthetic_tiny", [f"train.seed={2**32}"])


# ------------------------------------------------------------------------------ checkpoints


def test_rng_states_round_trip_through_weights_only(tmp_path: Path):
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    state = ckpt.rng_state()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch_save_atomic({"rng": state}, tmp_path / "r.pt")
    torch.rand(10), np.random.rand(10), random.random()
    ckpt.set_rng_state(load_torch_file(tmp_path / "r.pt")["rng"])
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0])
    assert np.array_equal(expected[1], again[1])
    assert expected[2] == again[2]


def test_load_rejects_foreign_files(tmp_path: Path):
    torch_save_atomic({"weights": torch.zeros(2)}, tmp_path / "x.pt")
    with pytest.raises(InputError, match="not an slsd training checkpoint"):
        ckpt.load(tmp_path / "x.pt")
    (tmp_path / "y.pt").write_bytes(b"garbage")
    with pytest.raises(InputError, match="unreadable checkpoint"):
        ckpt.load(tmp_path / "y.pt")


def test_stale_temp_files_are_removed(tmp_path: Path):
    path = tmp_path / "ckpt" / "last.pt"
    path.parent.mkdir()
    (path.parent / ".last.pt.abc123.tmp").write_bytes(b"partial")
    (path.parent / "other.txt").write_text("keep")
    assert ckpt.remove_stale_temps(path) == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["other.txt"]


# ------------------------------------------------------------------------------ the loop, on a small phase


class _Points(torch.utils.data.Dataset):
    """y = x @ w_true + noise, the noise drawn from the (per-sample seeded) global RNG."""

    w_true = torch.tensor([[1.5], [-2.0], [0.5]])

    def __init__(self, n=16):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        x = self.x[i]
        return x, x @ self.w_true + 0.01 * torch.randn(1)


def _stack(samples):
    return torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples])


class RegressionPhase:
    """A linear model as a `trainer.Phase` (exercises the loop without a detector)."""

    def __init__(self, cfg: TrainConfig, nan_at: set[int] = frozenset(), num_workers: int = 0, jitter: bool = True):
        seed_everything(cfg.seed)  # as the real phases: every run starts from the same RNG states
        self.jitter = jitter
        self.trainable = nn.Linear(3, 1)
        self.loader = StepLoader(_Points(), _stack, seed=cfg.seed, micro_batch=cfg.micro_batch,
                                 num_workers=num_workers)
        self.nan_at, self.calls, self.steps = nan_at, 0, []

    def modules(self):
        return {"model": self.trainable}

    def next_batch(self):
        # a jitter drawn from the global torch / numpy / python RNGs outside the loader's per-sample
        # seeding: a resumed run gets the unbroken run's draws only if the checkpoint restores them
        jitter = float(torch.rand(())) + float(np.random.rand()) + random.random() if self.jitter else 0.0
        x, y = self.loader.next()
        return x, y + 0.1 * jitter

    def losses(self, model, batch):
        x, y = batch
        loss = ((model(x) - y) ** 2).mean()
        self.calls += 1
        if self.calls in self.nan_at:
            loss = loss + float("nan")
        return {"mse": loss}

    def after_step(self, iteration):
        self.steps.append(iteration)

    def log_stats(self):
        return {"calls": float(self.calls)}

    def state_dict(self):
        return {"loader": self.loader.state_dict()}

    def load_state_dict(self, state):
        self.loader.load_state_dict(state["loader"])

    def export(self, run_dir):
        torch_save_atomic(self.trainable.state_dict(), Path(run_dir) / "final.pt")

    def close(self):
        self.loader.close()


def _cfg(**kw) -> TrainConfig:
    base = dict(iterations=12, batch_per_process=4, micro_batch=2, lr=0.3, weight_decay=0.0, layer_decay=1.0,
                warmup_iters=2, clip_grad=10.0, checkpoint_every=4, log_every=2, amp="auto", device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def _weights(run_dir: Path):
    return load_torch_file(run_dir / "final.pt")


def test_loop_learns_logs_and_resumes_bit_exactly(tmp_path: Path):
    cfg = _cfg()
    result = train(RegressionPhase(cfg), cfg, tmp_path / "a", CPU)
    lines = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [x["iter"] for x in lines] == [2, 4, 6, 8, 10, 12]
    assert lines[-1]["loss"] < 0.5 * lines[0]["loss"]
    assert {"lr", "losses", "images_per_s", "data_time_share", "grad_norm", "calls"} <= set(lines[0])
    assert result.iterations == 12 and result.skipped == 0
    state = ckpt.load(tmp_path / "a" / "ckpt" / "last.pt")
    assert state["iteration"] == 12 and state["phase"]["loader"]["consumed"] == 48

    # stop after 8 iterations (checkpoint at 8), resume, finish: the same weights, bit for bit
    class Stop(Exception):
        pass

    phase = RegressionPhase(cfg)
    original = phase.after_step

    def stop_after_8(iteration):
        original(iteration)
        if iteration == 8:  # the 9th iteration: the checkpoint of iteration 8 is on disk
            raise Stop

    phase.after_step = stop_after_8
    with pytest.raises(Stop):
        train(phase, cfg, tmp_path / "b", CPU)
    assert ckpt.load(tmp_path / "b" / "ckpt" / "last.pt")["iteration"] == 8
    phase = RegressionPhase(cfg)
    with torch.no_grad():  # scramble the fresh weights: they must come from the checkpoint
        phase.trainable.weight.normal_()
    torch.manual_seed(99), np.random.seed(99), random.seed(99)  # and the RNGs: they too
    train(phase, cfg, tmp_path / "b", CPU, resume=True)
    assert phase.steps == [8, 9, 10, 11]
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    iters = [json.loads(x)["iter"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert iters == [2, 4, 6, 8, 10, 12]  # the log is cut back to the checkpoint, not duplicated


class _Stop(Exception):
    pass


def _phase_stopping_after(cfg: TrainConfig, iteration: int, **kw) -> RegressionPhase:
    """A phase that raises _Stop in the after_step of `iteration` (0-based): the checkpoint of
    `iteration` (a multiple of checkpoint_every) is on disk, the next is not."""
    phase = RegressionPhase(cfg, **kw)
    original = phase.after_step

    def after_step(i):
        original(i)
        if i == iteration:
            raise _Stop

    phase.after_step = after_step
    return phase


def test_plain_log_lines_log_txt_and_timestamps_across_a_resume(tmp_path: Path, capsys):
    """stderr is not a terminal under pytest: every log window prints a plain line, the same lines
    go to RUN/log.txt (appended on resume), and every metrics record carries time and elapsed."""
    cfg = _cfg()
    run = tmp_path / "run"
    with pytest.raises(_Stop):
        train(_phase_stopping_after(cfg, 8), cfg, run, CPU)
    first = capsys.readouterr().err
    train(RegressionPhase(cfg), cfg, run, CPU, resume=True)
    second = capsys.readouterr().err
    lines = (run / "log.txt").read_text().splitlines()
    assert [int(line.split("iter ")[1].split("/")[0]) for line in lines] == [2, 4, 6, 8, 10, 12]
    for line in lines:
        assert "/12" in line and "loss " in line and "mse " in line and "lr " in line and " img/s" in line
        assert "data " in line and "elapsed 0:00:" in line and "eta " in line and "mem " not in line  # CPU
        assert line in first + second  # the same line on stderr
    assert "eta 0:00:00" in lines[-1] and "iter 12/12" in second and "iter 2/12" not in second
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(abs(r["time"] - time.time()) < 600 and r["elapsed"] >= 0 for r in records)
    elapsed = [r["elapsed"] for r in records]
    assert elapsed == sorted(elapsed)  # the resumed segment continues the clock of the checkpoint
    assert ckpt.load(run / "ckpt" / "last.pt")["trainer"]["elapsed"] >= elapsed[3]


def test_keep_last_keeps_the_newest_periodic_checkpoints(tmp_path: Path):
    cfg = _cfg(keep_last=2)
    train(RegressionPhase(cfg), cfg, tmp_path, CPU)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["iter_0000008.pt", "iter_0000012.pt", "last.pt"]
    assert ckpt.load(tmp_path / "ckpt" / "iter_0000008.pt")["iteration"] == 8
    assert ckpt.load(tmp_path / "ckpt" / "iter_0000012.pt")["iteration"] == 12
    cfg = _cfg(keep_last=0)
    train(RegressionPhase(cfg), cfg, tmp_path / "none", CPU)
    assert [p.name for p in (tmp_path / "none" / "ckpt").iterdir()] == ["last.pt"]


def test_resume_with_loader_workers_equals_an_unbroken_run_without(tmp_path: Path):
    """Data workers (2 processes, as the LVIS recipes use) change neither the stream nor the resume
    (no jitter: workers leave the main process's numpy / python RNGs unseeded, so its draws differ)."""
    cfg = _cfg()
    train(RegressionPhase(cfg, jitter=False), cfg, tmp_path / "a", CPU)
    stopped = _phase_stopping_after(cfg, 4, num_workers=2, jitter=False)
    with pytest.raises(_Stop):
        train(stopped, cfg, tmp_path / "b", CPU)
    stopped.close()  # as engine.launch does: stops the workers now, not at garbage collection
    phase = RegressionPhase(cfg, num_workers=2, jitter=False)
    try:
        train(phase, cfg, tmp_path / "b", CPU, resume=True)
    finally:
        phase.close()
    assert phase.steps == list(range(4, 12))
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nonfinite_step_is_skipped_then_repeated_ones_abort(tmp_path: Path):
    cfg = _cfg(iterations=6, micro_batch=4, max_nonfinite=3)
    phase = RegressionPhase(cfg, nan_at={2})
    result = train(phase, cfg, tmp_path / "one", CPU)
    assert result.skipped == 1
    assert phase.steps == [0, 2, 3, 4, 5]  # no optimizer step (nor after_step) for iteration 1
    text = (tmp_path / "one" / "metrics.jsonl").read_text()
    assert '"event": "nonfinite"' in text and '"skipped": true' in text and '"iter": 2' in text

    phase = RegressionPhase(cfg, nan_at={2, 3, 4})
    with pytest.raises(NonFiniteLossError, match="3 consecutive non-finite losses") as info:
        train(phase, cfg, tmp_path / "abort", CPU)
    assert "--resume" in str(info.value)
    state = ckpt.load(tmp_path / "abort" / "ckpt" / "last.pt")
    assert state["iteration"] == 4 and state["trainer"]["skipped"] == 3
    # the weights in that checkpoint are those after the last good step (iteration 1 of 4)
    phase = RegressionPhase(cfg)
    train(phase, cfg, tmp_path / "abort", CPU, resume=True)
    assert phase.steps == [4, 5]


def test_fp16_autocast_with_grad_scaler_trains_and_resumes(tmp_path: Path):
    """The fp16 path (autocast + GradScaler, whose state is checkpointed) on the CPU."""
    cfg = _cfg(amp="fp16", iterations=8)
    train(RegressionPhase(cfg), cfg, tmp_path / "a", CPU)
    state = ckpt.load(tmp_path / "a" / "ckpt" / "last.pt")
    assert state["scaler"]["scale"] > 0
    lines = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["loss"] < lines[0]["loss"]

    class Stop(Exception):
        pass

    phase = RegressionPhase(cfg)
    original = phase.after_step

    def stop(iteration):
        original(iteration)
        if iteration == 4:
            raise Stop

    phase.after_step = stop
    with pytest.raises(Stop):
        train(phase, cfg, tmp_path / "b", CPU)
    train(RegressionPhase(cfg), cfg, tmp_path / "b", CPU, resume=True)
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------ recipes


@pytest.mark.parametrize("name", ["lvis_eva02_L_teacher", "lvis_eva02_L_distill"])
def test_lvis_recipes_commented_eval_section_is_the_defaults(name, tmp_path):
    """The commented `eval:` example of the LVIS recipes, uncommented, is a valid section that keeps
    evaluation off (the EvalConfig defaults), so its keys cannot drift from the schema."""
    from slsd_cli.recipe import EvalConfig

    text = resolve_path(name).read_text()
    start = text.index("# eval:")
    block = text[start:].splitlines()
    assert all(line.startswith("#") for line in block)
    uncommented = text[:start] + "".join(line[2:] + "\n" for line in block)
    path = tmp_path / f"{name}.yaml"
    path.write_text(uncommented)
    assert load(path).eval == EvalConfig() == load(name).eval
    assert load(path, ["eval.every=5000", "eval.annotations=holdout.json"]).eval.every == 5000


def test_packaged_recipes_resolve_by_name_and_validate():
    assert {"synthetic_tiny", "lvis_eva02_L_teacher"} <= set(packaged_recipes())
    tiny = load("synthetic_tiny", ["train.lr=0.001"])
    assert isinstance(tiny, Recipe) and tiny.train.lr == 0.001 and tiny.model.backbone == "efficientnet_lite0"
    lvis = load("lvis_eva02_L_teacher")
    assert (lvis.model.backbone, lvis.train.lr, lvis.train.batch_per_process, lvis.train.layer_decay,
            lvis.train.weight_decay, lvis.train.warmup_iters, lvis.train.amp) == \
        ("eva02_large", 4e-5, 2, 0.8, 0.1, 1000, "bf16")
    assert (lvis.smoothing.mode, lvis.smoothing.epsilon, lvis.smoothing.gamma) == ("similarity", 0.1, 1.5)
    assert (lvis.data.image_size, lvis.data.repeat_threshold, lvis.model.use_federated) == (1024, 0.001, True)
    # the repo-root recipes/ folder is the same files
    root = REPO / "recipes"
    assert (root / "synthetic_tiny.yaml").read_text() == resolve_path("synthetic_tiny").read_text()
    with pytest.raises(InputError, match="unknown key train.lrr"):
        load("synthetic_tiny", ["train.lrr=1"])
    with pytest.raises(InputError, match="micro_batch"):
        load("synthetic_tiny", ["train.micro_batch=3"])
    with pytest.raises(InputError, match="recipe not found"):
        load("no_such_recipe")
