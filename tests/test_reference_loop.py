"""``tools/reference_loop.py`` (``bench_training.py --reference``) against a stand-in checkout that has
the reference's interface and its CUDA-only habits: ``.cuda()`` on every batch, a CUDA synchronize per
step, ``student.module``, an all-reduce in the loss. The real checkout is not fetched in tests."""

import sys
import textwrap

import pytest
import torch
from tool_utils import load_tool

STAND_IN = {
    "utils.py": '''
        import torch, torch.nn as nn
        calls = {"cuda": 0, "sync": 0}
        def is_dist_avail_and_initialized():
            return torch.distributed.is_initialized()
        class MultiCropWrapper(nn.Module):
            def __init__(self, backbone, head):
                super().__init__(); self.backbone, self.head = backbone, head
            def forward(self, x):
                return self.head(torch.cat([self.backbone(c) for c in x]))
        def get_params_groups(model):
            return [{"params": list(model.parameters())}]
        def clip_gradients(model, clip):
            return [p.grad.norm() for p in model.parameters() if p.grad is not None]
        def cancel_gradients_last_layer(epoch, model, freeze):
            pass
    ''',
    "vision_transformer.py": '''
        import torch.nn as nn
        class VisionTransformer(nn.Module):
            def __init__(self, patch_size, embed_dim, depth, num_heads, drop_path_rate=0.0, **kw):
                super().__init__(); self.embed_dim = embed_dim; self.proj = nn.LazyLinear(embed_dim)
            def forward(self, x):
                return self.proj(x.mean(dim=(2, 3)))
        class DINOHead(nn.Linear):
            def __init__(self, in_dim, out_dim, use_bn, norm_last_layer, nlayers, hidden_dim, bottleneck_dim):
                super().__init__(in_dim, out_dim)
    ''',
    "main_dino.py": '''
        import torch, torch.nn as nn, torch.distributed as dist
        import utils
        seen = []
        class DINOLoss(nn.Module):
            def __init__(self, out_dim, ncrops, warmup_temp, temp, warmup_epochs, nepochs):
                super().__init__(); self.ncrops = ncrops
            def forward(self, s, t, epoch):
                center = t.detach().mean(0, keepdim=True); dist.all_reduce(center)  # as update_center
                return (s.mean() - center.mean()) ** 2
        def train_one_epoch(student, teacher, teacher_without_ddp, dino_loss, data_loader, optimizer,
                            lr_schedule, wd_schedule, momentum_schedule, epoch, fp16_scaler, args):
            for it, (images, _) in enumerate(data_loader):
                images = [im.cuda(non_blocking=True) for im in images]
                utils.calls["cuda"] += 1
                loss = dino_loss(student(images), teacher(images[:2]), epoch)
                optimizer.zero_grad(); loss.backward(); optimizer.step()
                for q, k in zip(student.module.parameters(), teacher_without_ddp.parameters()):
                    k.data.mul_(momentum_schedule[it]).add_((1 - momentum_schedule[it]) * q.detach().data)
                torch.cuda.synchronize(); utils.calls["sync"] += 1
                seen.append(len(images))
            print("Averaged stats")  # silenced by the tool
            if utils.is_dist_avail_and_initialized():
                torch.tensor([1.0], device="cuda")  # the reference gathers its logs on the GPU
    ''',
}


def test_reference_loop_runs_the_checkouts_loop_on_a_cpu(tmp_path, capsys):
    for name, text in STAND_IN.items():
        (tmp_path / name).write_text(textwrap.dedent(text))
    bench = load_tool("bench_training")
    reference_loop = load_tool("reference_loop")
    cfg = bench.bench_config("fp32", 2, str(tmp_path / "out"), bench.QUICK_OPTS)
    crops = bench.fixed_batch(cfg, 2)[0]
    originals = (torch.Tensor.cuda, torch.cuda.synchronize)
    try:
        timed = reference_loop.time_reference_loop(str(tmp_path), cfg, crops, warmup=1, iters=3)
        main_dino, utils = sys.modules["main_dino"], sys.modules["utils"]
    finally:
        for name in ("main_dino", "utils", "vision_transformer"):  # the stand-in's names, gone again
            sys.modules.pop(name, None)
    assert main_dino.seen == [len(crops)] * 4  # 1 warm-up + 3 timed iterations, every crop passed
    assert utils.calls == {"cuda": 4, "sync": 4}  # patched .cuda() and synchronize were called
    assert timed["precision"] == "fp32" and timed["images_per_s"] > 0
    assert abs(timed["s_per_iter"] * timed["images_per_s"] - 2) < 1e-9
    assert "Averaged stats" not in capsys.readouterr().out
    # Everything patched for the loop is restored, and the one-process group is gone.
    assert not torch.distributed.is_initialized()
    assert (torch.Tensor.cuda, torch.cuda.synchronize) == originals
    assert utils.is_dist_avail_and_initialized.__module__ == "utils"  # the checkout's own function again


def test_bench_training_names_a_folder_that_is_not_a_checkout(tmp_path, capsys):
    with pytest.raises(SystemExit):
        load_tool("bench_training").main(["--quick", "--reference", str(tmp_path)])
    assert "not a facebookresearch/dino checkout" in capsys.readouterr().err
