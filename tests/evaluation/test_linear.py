"""Linear probe: features against get_intermediate_layers, the recipe's numbers, learning on separable
data (full loop and fast grid), and exact resume from the per-epoch checkpoint."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from dino_research.checkpoint import load_file
from dino_research.evaluation.linear import (
    LINEAR_CHECKPOINT,
    LinearClassifier,
    block_features,
    cosine_lr,
    linear_feature_dim,
    multiblock_features,
    scaled_linear_lr,
    select_features,
    topk_correct,
    train_linear,
)
from dino_research.evaluation.linear_fast import (
    CachedFeatures,
    LinearGrid,
    ProbeVariant,
    extract_block_features,
    probe_variants,
    train_linear_grid,
)
from dino_research.modeling import build_backbone


def identity(x):
    return x


def blobs(n, dim=16, classes=4, spread=0.3, seed=0):
    """Gaussian blobs around far-apart centers: linearly separable with a wide margin."""
    g = torch.Generator().manual_seed(seed)
    centers = 4.0 * torch.randn(classes, dim, generator=torch.Generator().manual_seed(123))
    labels = torch.arange(n) % classes
    return centers[labels] + spread * torch.randn(n, dim, generator=g), labels


# ------------------------------------------------------------------------------------------ features
@pytest.fixture(scope="module")
def tiny_vit():
    from conftest import tiny_cfg

    torch.manual_seed(0)
    return build_backbone(tiny_cfg(**{"MODEL.BACKBONE.DEPTH": 4}), drop_path_rate=0.0).eval()


def test_multiblock_features_concatenate_cls_tokens_oldest_first_then_patch_mean(tiny_vit):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        outs = tiny_vit.get_intermediate_layers(x, 3)  # 3 x (2, 1 + 4, 192)
        feats = multiblock_features(tiny_vit, x, n_last_blocks=3, avgpool_patchtokens=False)
        pooled = multiblock_features(tiny_vit, x, n_last_blocks=3, avgpool_patchtokens=True)
        last = multiblock_features(tiny_vit, x, n_last_blocks=1)
        cls = tiny_vit(x)
    D = 192
    assert feats.shape == (2, 3 * D) and pooled.shape == (2, 4 * D)
    for i in range(3):
        torch.testing.assert_close(feats[:, i * D:(i + 1) * D], outs[i][:, 0], rtol=0, atol=0)
    torch.testing.assert_close(pooled[:, :3 * D], feats, rtol=0, atol=0)
    hand_mean = sum(outs[2][:, 1 + p] for p in range(4)) / 4
    torch.testing.assert_close(pooled[:, 3 * D:], hand_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(last, cls, rtol=1e-5, atol=1e-5)  # n=1: the backbone's own output
    assert linear_feature_dim(tiny_vit, 3, True) == 4 * D and linear_feature_dim(tiny_vit, 1, False) == D


def test_cached_block_features_serve_every_variant(tiny_vit):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        cached = block_features(tiny_vit, x, 4)  # (2, 5, 192)
        assert cached.shape == (2, 5, 192)
        for variant in probe_variants(4):
            direct = multiblock_features(tiny_vit, x, variant.n_last_blocks, variant.avgpool)
            torch.testing.assert_close(select_features(cached, variant.n_last_blocks, variant.avgpool), direct,
                                       rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="n_last_blocks"):
        select_features(cached, 5, False)


def test_probe_variants_are_the_documented_set():
    assert probe_variants(4) == [ProbeVariant(1, False), ProbeVariant(1, True), ProbeVariant(4, False),
                                 ProbeVariant(4, True)]
    assert probe_variants(1) == [ProbeVariant(1, False), ProbeVariant(1, True)]
    assert probe_variants(None) == [ProbeVariant(None, False)]


def test_non_vit_backbone_gives_its_pooled_output():
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(12, 7))
    backbone.embed_dim = 7
    x = torch.randn(3, 3, 2, 2)
    torch.testing.assert_close(multiblock_features(backbone, x, n_last_blocks=4, avgpool_patchtokens=True), backbone(x))
    assert linear_feature_dim(backbone, 4, True) == 7
    assert block_features(backbone, x, 4).shape == (3, 1, 7)


def test_linear_classifier_is_one_linear_layer_with_reference_init():
    torch.manual_seed(0)
    clf = LinearClassifier(1000, 500)
    assert [type(m) for m in clf.modules()] == [LinearClassifier, nn.Linear]
    assert abs(clf.linear.weight.std().item() - 0.01) < 2e-4 and abs(clf.linear.weight.mean().item()) < 2e-4
    assert torch.count_nonzero(clf.linear.bias) == 0
    assert clf(torch.randn(2, 1000)).shape == (2, 500)


# ------------------------------------------------------------------------------------------ recipe
def test_lr_scaling_and_cosine_end_points():
    assert scaled_linear_lr(0.001, 1024) == pytest.approx(0.004)
    assert scaled_linear_lr(0.001, 256) == pytest.approx(0.001)
    sched = cosine_lr(0.4, 10)
    assert sched(0) == pytest.approx(0.4)
    assert sched(5) == pytest.approx(0.2)
    assert sched(9) == pytest.approx(0.4 * 0.5 * (1 + math.cos(math.pi * 9 / 10)))
    assert all(sched(i) > sched(i + 1) for i in range(9))


def test_topk_correct_on_a_hand_made_case():
    logits = torch.tensor([[0.0, 1, 2, 3, 4, 5, 6], [6.0, 5, 4, 3, 2, 1, 0], [6.0, 5, 4, 3, 2, 1, 0]])
    labels = torch.tensor([6, 4, 5])  # ranked 1st (top-1), 5th (top-5 only), 6th (neither)
    assert topk_correct(logits, labels, ks=(1, 5)).tolist() == [1.0, 2.0]
    # Top-5 of a 3-class problem is top-3: always right.
    assert topk_correct(logits[:, :3], torch.tensor([2, 2, 0]), ks=(1, 5)).tolist() == [2.0, 3.0]


# ------------------------------------------------------------------------------------------ full loop
def test_full_probe_reaches_100_percent_on_separable_features(tmp_path):
    train, val = TensorDataset(*blobs(256)), TensorDataset(*blobs(128, seed=1))
    torch.manual_seed(0)
    clf = LinearClassifier(16, 4)
    result = train_linear(identity, clf, train, val, epochs=3, lr=0.1, batch_size=32, output_dir=str(tmp_path),
                          log_period=0)
    assert [h["epoch"] for h in result["history"]] == [0, 1, 2]
    assert result["last"]["top1"] == 100.0 and result["best"]["top1"] == 100.0
    assert result["best"]["epoch"] == 0  # the earliest of the epochs at 100%
    assert result["history"][-1]["train_loss"] < result["history"][0]["train_loss"]
    state = load_file(str(tmp_path / LINEAR_CHECKPOINT))
    assert state["epoch"] == 3 and state["best"]["top1"] == 100.0
    # The last step ran at the cosine value of the last of 3 x 8 iterations.
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 23 / 24)))
    assert state["optimizer"]["param_groups"][0]["momentum"] == 0.9
    assert state["optimizer"]["param_groups"][0]["weight_decay"] == 0.0


class CrashAfter:
    """Identity embedding that raises on call number ``limit + 1``: a run killed mid-training."""

    def __init__(self, limit):
        self.limit, self.calls = limit, 0

    def __call__(self, x):
        self.calls += 1
        if self.calls > self.limit:
            raise KeyboardInterrupt("killed")
        return x


def test_resume_continues_at_the_next_epoch_with_identical_final_weights(tmp_path):
    train, val = TensorDataset(*blobs(96, spread=3.0)), TensorDataset(*blobs(40, spread=3.0, seed=1))
    kwargs = dict(epochs=4, lr=0.05, batch_size=16, log_period=0, seed=3)  # 6 train + 3 val batches/epoch

    torch.manual_seed(0)
    straight = LinearClassifier(16, 4)
    full = train_linear(identity, straight, train, val, output_dir=str(tmp_path / "a"), **kwargs)

    torch.manual_seed(0)
    crash = CrashAfter(2 * (6 + 3) + 2)  # dies two batches into epoch 3
    with pytest.raises(KeyboardInterrupt):
        train_linear(crash, LinearClassifier(16, 4), train, val, output_dir=str(tmp_path / "b"), **kwargs)
    assert load_file(str(tmp_path / "b" / LINEAR_CHECKPOINT))["epoch"] == 2

    torch.manual_seed(1)  # another initialization: the checkpoint must replace it
    resumed = LinearClassifier(16, 4)
    counter = CrashAfter(10**9)
    result = train_linear(counter, resumed, train, val, output_dir=str(tmp_path / "b"), **kwargs)
    assert counter.calls == 2 * (6 + 3)  # only epochs 2 and 3 were run
    assert [h["epoch"] for h in result["history"]] == [0, 1, 2, 3]
    assert result["history"] == full["history"]
    for key, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key

    with pytest.raises(ValueError, match="delete it"):  # a changed schedule cannot resume silently
        train_linear(identity, resumed, train, val, output_dir=str(tmp_path / "b"), **{**kwargs, "epochs": 5})


# ------------------------------------------------------------------------------------------ fast grid
def test_grid_gives_every_classifier_its_own_logits_and_gradient():
    torch.manual_seed(0)
    variants = probe_variants(2)
    grid = LinearGrid(variants, embed_dim=5, num_lrs=3, num_classes=4)
    cached, y = torch.randn(6, 3, 5), torch.randint(0, 4, (6,))
    logits = grid(cached)
    assert logits.shape == (6, 4, 3, 4)
    loss = F.cross_entropy(logits.flatten(0, 2), y.repeat_interleave(12), reduction="sum") / 6
    loss.backward()
    for v, variant in enumerate(variants):
        for l in range(3):
            clf = grid.classifier(v, l)
            weight = clf.linear.weight.detach().clone().requires_grad_(True)
            x = select_features(cached, variant.n_last_blocks, variant.avgpool)
            alone = x @ weight.t() + clf.linear.bias.detach()
            torch.testing.assert_close(logits[:, v, l], alone, rtol=1e-6, atol=1e-6)
            F.cross_entropy(alone, y).backward()
            torch.testing.assert_close(clf.linear.weight.grad, weight.grad, rtol=1e-5, atol=1e-7)


def make_cached(n, seed):
    """(n, 3, 16) cached features of 2 blocks + avgpool; only the avgpool row carries the class."""
    g = torch.Generator().manual_seed(seed + 100)
    informative, labels = blobs(n, seed=seed)
    cls_rows = torch.randn(n, 2, 16, generator=g)
    return CachedFeatures(torch.cat([cls_rows, informative[:, None]], dim=1), labels, n)


def test_fast_grid_learns_separable_features_and_finds_the_informative_variant():
    train, val = make_cached(256, 0), make_cached(128, 1)
    variants = probe_variants(2)
    grid, results = train_linear_grid(train, val, variants=variants, lrs=[1e-6, 0.1], num_classes=4, epochs=3,
                                      batch_size=32, log_period=0)
    assert [(r["n_last_blocks"], r["avgpool"], r["lr"]) for r in results] == [
        (v.n_last_blocks, v.avgpool, lr) for v in variants for lr in (1e-6, 0.1)]
    acc = {(r["n_last_blocks"], r["avgpool"], r["lr"]): r["top1"] for r in results}
    assert acc[(1, True, 0.1)] == 100.0 and acc[(2, True, 0.1)] == 100.0
    assert acc[(1, False, 0.1)] < 60.0 and acc[(2, False, 0.1)] < 60.0  # noise only: about chance (25%)
    assert acc[(1, True, 1e-6)] < acc[(1, True, 0.1)]  # a learning rate too small to learn in 3 epochs
    assert all(0 <= r["top5"] <= 100 and r["top5"] >= r["top1"] for r in results)
    assert grid.classifier(1, 1).linear.weight.shape == (4, 32)



def test_fast_mode_on_a_non_vit_backbone_uses_its_pooled_output():
    x, y = blobs(128)
    backbone = nn.Flatten()  # (B, 1, 4, 4) "images" -> (B, 16) "pooled features"
    backbone.embed_dim = 16
    images = TensorDataset(x.view(-1, 1, 4, 4), y)
    train = extract_block_features(backbone, images, n_blocks=4, batch_size=10, device="cpu")
    assert train.features.shape == (128, 1, 16) and train.dataset_size == 128
    torch.testing.assert_close(train.features[:, 0], x, rtol=0, atol=0)
    assert torch.equal(train.labels, y)
    vx, vy = blobs(64, seed=1)
    val = CachedFeatures(vx[:, None], vy, 64)
    _, results = train_linear_grid(train, val, variants=probe_variants(None), lrs=[0.1], num_classes=4, epochs=2,
                                   batch_size=16, log_period=0)
    assert len(results) == 1 and results[0]["n_last_blocks"] is None and results[0]["top1"] == 100.0


# ------------------------------------------------------------------------------------------ DDP (gloo)
def _ddp_worker(rank, world_size, out):
    train, val = TensorDataset(*blobs(96, spread=3.0)), TensorDataset(*blobs(40, spread=3.0, seed=1))
    torch.manual_seed(rank)  # different per rank: the DDP wrapper must broadcast rank 0's weights
    clf = LinearClassifier(16, 4)
    if rank == 0:
        torch.save(clf.state_dict(), f"{out}.init")
    result = train_linear(identity, clf, train, val, epochs=2, lr=0.05, batch_size=8, log_period=0, seed=3)
    _, grid = train_linear_grid(make_cached(96, 0), make_cached(40, 1), variants=probe_variants(2), lrs=[0.1],
                                num_classes=4, epochs=2, batch_size=8, log_period=0)
    torch.save({"state": clf.state_dict(), "result": result, "grid": grid}, f"{out}.{rank}")


def test_two_gloo_ranks_train_like_one_process_with_the_total_batch(tmp_path):
    """Ranks take interleaved halves of the same epoch order, so 2 x batch 8 sees what 1 x batch 16 sees."""
    from dist_utils import run_on_gloo

    out = str(tmp_path / "ddp")
    run_on_gloo(_ddp_worker, 2, out)
    train, val = TensorDataset(*blobs(96, spread=3.0)), TensorDataset(*blobs(40, spread=3.0, seed=1))
    single = LinearClassifier(16, 4)
    single.load_state_dict(torch.load(f"{out}.init", weights_only=True))
    expected = train_linear(identity, single, train, val, epochs=2, lr=0.05, batch_size=16, log_period=0, seed=3)
    ranks = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    for got in ranks:
        for key, value in single.state_dict().items():
            torch.testing.assert_close(got["state"][key], value, rtol=0, atol=1e-6, msg=key)
        # Accuracies are counted over both ranks' shares of the val set: those of the single process.
        assert [h["top1"] for h in got["result"]["history"]] == [h["top1"] for h in expected["history"]]
    assert ranks[0]["grid"] == ranks[1]["grid"]  # grid accuracies all-reduced: the same on every rank
    acc = {(r["n_last_blocks"], r["avgpool"]): r["top1"] for r in ranks[0]["grid"]}
    assert acc[(2, True)] == 100.0 and acc[(2, False)] < 60.0
