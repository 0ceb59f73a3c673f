"""hubconf.py through torch.hub.load(source="local"): an entry point per registered architecture,
local weights (ours and the official layout), never a download."""

import importlib.util
import socket
from pathlib import Path

import pytest
import torch

from dino_research.checkpoint import Checkpointer, export_backbone
from dino_research.evaluation.hub import ENTRY_POINTS, HubError
from dino_research.evaluation.weights import load_backbone
from dino_research.modeling import BACKBONE_REGISTRY, build_model
from dino_research.modeling.backbones import DINOVisionTransformer

REPO = str(Path(__file__).resolve().parents[1])
CORE_BACKBONES = {"vit_tiny", "vit_small", "vit_base", "resnet50", "cifar_resnet", "timm"}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Any network connection fails the test: the hub must work offline."""
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def hub(entry, **kwargs):
    return torch.hub.load(REPO, entry, source="local", **kwargs)


def test_every_registered_architecture_has_an_entry_point():
    assert CORE_BACKBONES <= set(dict(BACKBONE_REGISTRY))
    assert {name for name, _ in ENTRY_POINTS.values()} == CORE_BACKBONES
    spec = importlib.util.spec_from_file_location("hubconf_under_test", Path(REPO) / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    entries = {n for n in dir(hubconf) if callable(getattr(hubconf, n)) and not n.startswith("_")}  # torch.hub's rule
    assert entries == set(ENTRY_POINTS)
    for entry, (name, patch) in ENTRY_POINTS.items():
        if name.startswith("vit_"):
            model = hub(entry, pretrained=False, depth=1)
            assert isinstance(model, DINOVisionTransformer) and model.patch_size == patch and len(model.blocks) == 1
            assert model(torch.randn(1, 3, 2 * patch, 3 * patch)).shape == (1, model.embed_dim)
            assert not model.training
    assert hub("dino_resnet50").embed_dim == 2048
    assert hub("dino_cifar_resnet", width=8)(torch.randn(2, 3, 32, 32)).shape == (2, 64)
    assert hub("dino_timm", timm_model="resnet18").embed_dim == 512


def test_pretrained_true_explains_there_is_no_download():
    with pytest.raises(HubError, match=r"dino_vits16\(pretrained=True\): dino_research never downloads.*weights=PATH"):
        hub("dino_vits16", pretrained=True)


def test_weights_of_a_training_checkpoint_and_of_an_official_file(tmp_path, make_tiny_cfg):
    cfg = make_tiny_cfg(**{"MODEL.BACKBONE.DEPTH": 2, "MODEL.BACKBONE.PATCH_SIZE": 8})
    model = build_model(cfg)
    checkpoint = Checkpointer(str(tmp_path), model).save("model.pth", iteration=1, config=cfg.dump())
    x = torch.randn(2, 3, 32, 40)
    with torch.no_grad():
        want = load_backbone(cfg, checkpoint, "student")(x)
        got = hub("dino_vitt8", weights=checkpoint, checkpoint_key="student")
        assert len(got.blocks) == 2  # the depth comes from the checkpoint
        torch.testing.assert_close(got(x), want, rtol=0, atol=0)
        # The official layout: a plain backbone state dict (architecture from the entry point).
        official = str(tmp_path / "dino_official.pth")
        export_backbone(model.teacher.backbone, official)
        loaded = hub("dino_vitt8", weights=official, depth=2)
        torch.testing.assert_close(loaded(x), model.teacher.backbone.eval()(x), rtol=0, atol=0)
    with pytest.raises(HubError, match=r"holds a vit_tiny/8 backbone.*'dino_vitt8'"):
        hub("dino_vits16", weights=checkpoint)
    from dino_research.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="(?i)missing|unexpected"):  # strict: never a partial load
        hub("dino_vitt8", weights=official, depth=3)
