"""What a CUDA run does differently, checked on the CPU with stand-ins (issue 12): a checkpoint resumed onto another
device (the meta device), mixed precision (CPU autocast in float16 / bfloat16 standing in for the GPU's), the
backend switches, one persistent loader across epochs, and per-fold result files merged into one table (the
augmentation where the batch lands: tests/test_augmentation.py)."""
import json

import pytest
import torch

import basnet_train
import evaluate
import model
import saliency_train
import train_fss
from datasets import voc_image_set
from demo_data import make_demo_data
from model import configure_backends, hybrid_loss, load_checkpoint, mixed_precision
from test_basnet import write_pairs


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("demo")
    mp.setenv("MASKSPLIT_CACHE", str(root / "cache"))
    paths = make_demo_data(root / "data", train_images=20, val_images=40, salient_images=0, coco_images=0)
    yield paths
    mp.undo()


def train(demo, out, *extra):
    """train_fss.py on 6 demo images, 2 steps per epoch, on the CPU (exact there); returns the log lines."""
    stems = voc_image_set(demo["voc"], "train")[:6]
    (out.parent / "six.txt").write_text("\n".join(stems) + "\n")
    train_fss.main(["--mask-source", "gt", "--voc-root", str(demo["voc"]), "--list", str(out.parent / "six.txt"),
                    "--backbone", "efficientnet_lite0", "--weights", "none", "--image-size", "64", "--batch-size", "4",
                    "--workers", "0", "--log-every", "1", "--device", "cpu", "--out", str(out), *extra])
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("fss") / "straight"
    return out, train(demo, out, "--max-steps", "5")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_cuda_run_follows_the_cpu_run(demo, straight, tmp_path):
    # the same batches and augmentation draws on the GPU (autocast, cuDNN, atomic adds): close, not equal. On the
    # CPU, bfloat16 autocast alone moves these five losses by at most 0.4%; 3% leaves room for the GPU's kernels.
    log = train(demo, tmp_path / "cuda", "--max-steps", "5", "--device", "cuda")
    assert [x["loss"] for x in log] == pytest.approx([x["loss"] for x in straight[1]], rel=0.03)


@pytest.fixture
def fake_gpu_precision(monkeypatch):
    """CPU autocast in the dtype a GPU would get: mixed_precision(cpu) then behaves as on that GPU."""
    def use(dtype):
        monkeypatch.setattr(model, "autocast_dtype", lambda device: dtype)
    return use


@pytest.mark.filterwarnings("ignore:.*to a meta parameter")
def test_resume_loads_the_checkpoint_on_the_cpu_whatever_the_device(demo, straight, tmp_path):
    # a GPU run resumed with map_location=its device: the RNG states became CUDA tensors and restore_rng raised
    # "TypeError: RNG state must be a torch.ByteTensor". The meta device stands in for CUDA (same TypeError). The
    # checkpoint is at --max-steps, so the resume loads and restores everything and has no step left to run.
    assert train(demo, straight[0], "--max-steps", "5", "--resume", "--device", "meta") == straight[1]
    state = load_checkpoint(straight[0] / "last.pt")
    assert state["rng"]["torch"].device.type == "cpu" and state["rng"]["torch"].dtype == torch.uint8
    assert {t.device.type for t in state["model"].values()} == {"cpu"}

    write_pairs(tmp_path / "sal", n=2)
    args = ["--images", str(tmp_path / "sal" / "images"), "--masks", str(tmp_path / "sal" / "labels"),
            "--out", str(tmp_path / "basnet"), "--max-steps", "1", "--image-size", "32", "--crop", "24",
            "--batch-size", "2", "--weights", "none", "--workers", "0", "--device", "cpu"]
    basnet_train.main(args)
    basnet_train.main(args + ["--resume", "--device", "meta"])


def test_persistent_loader_and_deterministic_flag_change_no_number(demo, straight, tmp_path):
    # one loader with a worker process across three epochs (the epoch travels with the index), and torch's
    # deterministic algorithms: the same losses as the in-process run (the CPU is deterministic anyway)
    try:
        log = train(demo, tmp_path / "run", "--max-steps", "5", "--workers", "1", "--deterministic")
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        configure_backends(torch.device("cpu"))
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
    assert [x["loss"] for x in log] == [x["loss"] for x in straight[1]]
    assert [x["epoch"] for x in log] == [0, 0, 1, 1, 2] and all(x["data_s"] >= 0 for x in log)


def test_mixed_precision_decision(monkeypatch):
    autocast, scaler = mixed_precision(torch.device("cpu"))
    with autocast():  # a no-op on the CPU
        assert torch.ones(2, 2).mm(torch.ones(2, 2)).dtype == torch.float32
    assert not scaler.is_enabled()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # so that GradScaler("cuda") stays enabled
    for capability, dtype, scaled in (((7, 5), torch.float16, True), ((8, 0), torch.bfloat16, False),
                                      ((9, 0), torch.bfloat16, False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        _, scaler = mixed_precision(torch.device("cuda"))
        assert model.autocast_dtype(torch.device("cuda")) == dtype and scaler.is_enabled() == scaled


def test_auto_device_says_when_torch_sees_no_gpu(monkeypatch, capsys):
    # PyPI's CUDA 13 wheels on an older driver: torch.cuda.is_available() is False, and auto falls back to the CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert model.pick_device("auto") == torch.device("cpu")
    assert "sees no CUDA GPU" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Stand-in GPU")
    assert model.pick_device("auto") == torch.device("cuda")
    assert capsys.readouterr().err == "device: cuda (Stand-in GPU)\n"


def test_float16_gradients_underflow_without_the_scaler():
    # why float16 comes with a GradScaler: d(mean BCE)/d(logit) = (p - t) / N over N ~ 1e6 pixels. Once predictions
    # are confident (|p - t| < 0.06), half of them are under 3e-8 and round to zero in float16 (smallest subnormal
    # 6e-8); scaled by GradScaler's initial 2 ** 16 first, none does
    torch.manual_seed(0)
    residual = torch.rand(10 ** 6) * 0.06
    grad = residual / residual.numel()
    assert (grad.half() == 0).float().mean().item() > 0.45
    assert ((grad * 2.0 ** 16).half() == 0).float().mean().item() < 1e-4


def test_ssim_stays_float32_under_autocast_without_tf32_forward_and_backward(monkeypatch):
    # SSIM's variances are differences of nearly equal local means: TF32 convolutions (cuDNN's default) would move
    # them, in the forward pass and in the gradients alike. The spy records the flag at every convolution SSIM
    # runs, its backward's included (the CPU stands in: the flag is what cuDNN reads on a GPU).
    torch.manual_seed(0)
    target = (torch.rand(2, 1, 32, 32) > 0.5).float()
    outputs = [(torch.randn(2, 1, 32, 32) * 3).requires_grad_() for _ in range(8)]
    exact = hybrid_loss(outputs, target)
    exact.backward()
    exact_grads = [o.grad.clone() for o in outputs]
    seen = []

    def spy(convolution):
        def recorded(*a, **k):
            out = convolution(*a, **k)
            seen.append((torch.backends.cudnn.allow_tf32, out.dtype, torch.is_grad_enabled()))
            return out
        return recorded

    monkeypatch.setattr(model.F, "conv2d", spy(torch.nn.functional.conv2d))
    monkeypatch.setattr(torch.nn.grad, "conv2d_input", spy(torch.nn.grad.conv2d_input))
    for o in outputs:
        o.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):  # stands in for the GPU's autocast
        loss = hybrid_loss(outputs, target)
    assert loss.item() == exact.item()
    forward = len(seen)
    loss.backward()
    assert len(seen) > forward                                     # the backward convolved too
    assert {(tf32, dtype) for tf32, dtype, _ in seen} == {(False, torch.float32)}
    assert all(torch.equal(o.grad, g) for o, g in zip(outputs, exact_grads))
    assert torch.backends.cudnn.allow_tf32  # restored
    window = torch.rand(1, 1, 5, 5, dtype=torch.float64)
    torch.autograd.gradcheck(model._GaussianFilter.apply, (torch.rand(2, 1, 9, 9, dtype=torch.float64,
                                                                      requires_grad=True), window))


class TinySaliency(torch.nn.Module):
    """Stands in for BAS-Net (8 logit maps) where its size does not matter: CPU float16 kernels are emulated, slow."""

    def __init__(self, weights, encoder="resnet34", width=1.0):
        super().__init__()
        self.config, self.conv = {}, torch.nn.Conv2d(3, 1, 3, padding=1)

    def forward(self, x):
        return [self.conv(x)] * 8


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_trainers_under_gpu_mixed_precision(demo, tmp_path, monkeypatch, fake_gpu_precision, dtype):
    # the GPU's autocast dtype, on the CPU: train_fss.py and basnet_train.py train, and with float16 the gradient
    # scaler runs and is saved in the checkpoint for --resume
    fake_gpu_precision(dtype)
    log = train(demo, tmp_path / "fss", "--max-steps", "2", "--image-size", "32", "--batch-size", "2")
    assert all(x["loss"] == x["loss"] for x in log)  # not NaN
    scaled = dtype == torch.float16
    assert bool(load_checkpoint(tmp_path / "fss" / "last.pt")["scaler"]) == scaled
    monkeypatch.setattr(basnet_train, "BASNet", TinySaliency)
    write_pairs(tmp_path / "sal", n=2)
    basnet_train.main(["--images", str(tmp_path / "sal" / "images"), "--masks", str(tmp_path / "sal" / "labels"),
                       "--out", str(tmp_path / "basnet"), "--max-steps", "2", "--image-size", "32", "--crop", "24",
                       "--batch-size", "2", "--weights", "none", "--workers", "0", "--device", "cpu"])
    assert bool(load_checkpoint(tmp_path / "basnet" / "last.pt")["scaler"]) == scaled
    saliency_train.main(["--images", str(tmp_path / "sal" / "images"), "--out", str(tmp_path / "deepusps"),
                         "--backbone", "efficientnet_lite0", "--weights", "none", "--image-size", "32",
                         "--prior-size", "32", "--superpixels", "20", "--priors", "rbd", "--rounds", "1",
                         "--epochs", "1", "--batch-size", "2", "--no-crf", "--device", "cpu"])
    assert bool(load_checkpoint(tmp_path / "deepusps" / "last.pt")["scaler"]) == scaled


def test_per_fold_result_files_merge_into_one_table(demo, straight, tmp_path):
    def run(folds, out, *extra):
        evaluate.main(["fss", "--checkpoint", str(straight[0] / "last.pt"), "--voc-root", str(demo["voc"]),
                       "--fold", folds, "--runs", "2", "--episodes", "4", "--image-size", "64", "--workers", "0",
                       "--device", "cpu", "--out", str(tmp_path / out), *extra])
        return tmp_path / out

    together = json.loads(run("0,1", "both.json").read_text())
    parts = [run("1", "one.json"), run("0", "zero.json")]
    evaluate.main(["merge", *map(str, parts), "--out", str(tmp_path / "merged.json")])
    merged = json.loads((tmp_path / "merged.json").read_text())
    for key in ("fold0", "fold1", "mean", "backbone_forwards"):
        assert merged[key] == together[key]
    assert list(merged) == list(together) and set(merged["config"]["merged"]) == set(map(str, parts))
    with pytest.raises(SystemExit, match="fold1 is also in another file"):
        evaluate.main(["merge", str(parts[0]), str(tmp_path / "both.json"), "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit, match="--episodes 3 vs 4"):
        evaluate.main(["merge", str(parts[0]), str(run("2", "other.json", "--episodes", "3")),
                       "--out", str(tmp_path / "x.json")])
