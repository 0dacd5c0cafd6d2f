"""DeSTSeg (Zhang, Li, Zhou, Chen & Lin, "DeSTSeg: Segmentation Guided Denoising Student-Teacher for
Anomaly Detection", CVPR 2023).

A frozen pretrained teacher (ResNet-18 layer1-3) and a denoising student (a random ResNet-18 encoder
plus a decoder back to the teacher's three levels): trained first to give, for an image with a
synthetic anomaly, the teacher's features of the clean image; then, student frozen, a segmentation
network learns to read the synthetic masks from the product of the channel-normalised teacher and
student features of the same image. The blocks of the student decoder and the segmentation network
are ResNet basic blocks (:mod:`threecad.backbones.resnet`); the synthesis is
:mod:`threecad.synth.anomalies` with DeSTSeg's parameters (:func:`threecad.synth.anomalies.destseg_synthesis`).

Official configuration, kept (official code ``apple/ml-destseg``): the ImageNet V1 ResNet-18
teacher, student encoder 11,176,512 + decoder 13,488,512 parameters, segmentation network
7,706,369 (ASPP rates 6/12/18); phase 1 = 1000 steps of SGD (momentum 0.9, weight decay 1e-4, lr
0.4) on the student with the cosine loss (per level the mean over positions of ``1 - cos``, summed
over the batch and the levels); phase 2 = 4000 steps of SGD on the segmentation network (residual
blocks lr 0.1, ASPP head lr 0.01) with focal (gamma 4) + L1 loss against the mask resized to the
stride-4 grid; batch 32 with incomplete batches dropped; 256 px; the last step is kept. Map = the
segmentation output upsampled bilinearly to the input, unsmoothed; image score = the mean of its
100 largest values. See ``docs/method-draem-destseg.md`` for the departures.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from threecad.backbones.extractor import BackboneTaps
from threecad.backbones.registry import canonical_name
from threecad.backbones.resnet import BasicBlock, init_like_torchvision, resnet18
from threecad.device import resolve_device
from threecad.errors import ThreecadError
from threecad.maps.postprocess import top_fraction_mean
from threecad.methods import Method, Option, register
from threecad.methods.batching import train_subset
from threecad.methods.blocks import FrozenPartNet, Teacher, build_teacher, focal_loss
from threecad.methods.method import NetInference
from threecad.methods.training import TrainSettings, seeded
from threecad.methods.training import fit as engine_fit
from threecad.synth.anomalies import (
    IMAGE_ROTATIONS,
    SyntheticAnomalyDataset,
    TextureBank,
    collate,
    destseg_synthesis,
)

log = logging.getLogger(__name__)

PAPER_TEACHER = "resnet18"
#: The student encoder's output (ResNet-18 layer4) and the input side divisibility it needs.
STUDENT_CHANNELS, STRIDE = 512, 32
#: ASPP dilation rates and the focal loss's gamma (official).
ASPP_RATES, FOCAL_GAMMA = (6, 12, 18), 4.0
#: The official normal-image rotation per MVTec AD category (``rotation="mvtec"``; others: none).
MVTEC_ROTATION = {
    **dict.fromkeys(("capsule", "metal_nut", "pill", "toothbrush", "transistor"), "none"),
    **dict.fromkeys(("wood", "zipper", "cable"), "small"),
    **dict.fromkeys(("bottle", "grid", "hazelnut", "leather", "tile", "carpet", "screw"), "right"),
}
MAPS = ("segmentation", "dest")


# --------------------------------------------------------------------------------------------- networks
class Block(BasicBlock):
    """A ResNet basic block (1x1 conv + BN shortcut when the width changes); ``relu_out=False`` drops
    the ReLU after the residual sum, for student outputs that must match signed teacher features."""

    def __init__(self, c_in: int, c_out: int, relu_out: bool = True):
        shortcut = None if c_in == c_out else nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False),
                                                            nn.BatchNorm2d(c_out))
        super().__init__(c_in, c_out, downsample=shortcut)
        self.relu_out = relu_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + identity
        return self.relu(out) if self.relu_out else out


def _stage(c_in: int, c_out: int, blocks: int = 2, relu_out: bool = True) -> nn.Sequential:
    layers = [Block(c_in, c_out)] + [Block(c_out, c_out) for _ in range(1, blocks)]
    layers[-1].relu_out = relu_out
    return nn.Sequential(*layers)


class Student(nn.Module):
    """Random ResNet-18 encoder to layer4 (every residual block's last BN weight zero, the official
    timm initialisation) and a decoder of four 2-block stages: ``512 -> 512`` at stride 32, then
    bilinear to each teacher level's grid and ``-> c3``, ``-> c2``, ``-> c1``. Returns the three
    levels fine to coarse, shaped like the teacher's."""

    def __init__(self, channels: tuple[int, int, int], signed: bool = False):
        super().__init__()
        encoder = resnet18()
        for m in encoder.modules():
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)
        self.encoder = BackboneTaps(encoder, ["layer4"])
        c1, c2, c3 = channels
        widths = ((STUDENT_CHANNELS, STUDENT_CHANNELS), (STUDENT_CHANNELS, c3), (c3, c2), (c2, c1))
        self.decoder = nn.ModuleList(_stage(a, b, relu_out=not signed or i == 0) for i, (a, b) in enumerate(widths))
        init_like_torchvision(self.decoder)

    def forward(self, x: torch.Tensor, sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
        x = self.decoder[0](self.encoder(x)["layer4"])
        out = []
        for stage, size in zip(self.decoder[1:], reversed(sizes)):
            x = stage(F.interpolate(x, size=size, mode="bilinear", align_corners=False))
            out.append(x)
        return out[::-1]


def _conv_bn_relu(c_in: int, c_out: int, kernel: int = 3, dilation: int = 1) -> nn.Sequential:
    padding = dilation * (kernel // 2)
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, padding=padding, dilation=dilation, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: an image-pooling branch (global mean, 1x1 conv-BN-ReLU, spread
    back over the grid) and one dilated 3x3 conv-BN-ReLU per rate, concatenated and fused by a 3x3
    conv-BN-ReLU."""

    def __init__(self, c_in: int, c_out: int, rates: tuple[int, ...] = ASPP_RATES):
        super().__init__()
        self.pool = _conv_bn_relu(c_in, c_out, kernel=1)
        self.branches = nn.ModuleList(_conv_bn_relu(c_in, c_out, dilation=r) for r in rates)
        self.fuse = _conv_bn_relu((1 + len(rates)) * c_out, c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(F.adaptive_avg_pool2d(x, 1))
        parts = [F.interpolate(pooled, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)]
        return self.fuse(torch.cat(parts + [branch(x) for branch in self.branches], dim=1))


class SegmentationNet(nn.Module):
    """Two basic blocks to ``width`` (kaiming-initialised), then the head: ASPP, 3x3 conv-BN-ReLU and
    a 1x1 conv to one logit (PyTorch's default initialisation, as the official head); sigmoid."""

    def __init__(self, c_in: int, width: int = 256):
        super().__init__()
        self.res = _stage(c_in, width)
        init_like_torchvision(self.res)
        self.head = nn.Sequential(ASPP(width, width), _conv_bn_relu(width, width), nn.Conv2d(width, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.head(self.res(x)))


def _normalised(feats: list[torch.Tensor]) -> list[torch.Tensor]:
    return [F.normalize(f.float(), dim=1, eps=1e-12) for f in feats]


def cosine_distances(teacher: list[torch.Tensor], student: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per level (B, 1, h, w): ``1 - cos`` over channels between teacher and student features."""
    return [1 - (t * s).sum(1, keepdim=True) for t, s in zip(_normalised(teacher), _normalised(student))]


def segmentation_input(teacher: list[torch.Tensor], student: list[torch.Tensor]) -> torch.Tensor:
    """The segmentation network's input: per level ``-t * s`` of the channel-normalised features,
    bilinear to the finest level's grid, concatenated over levels."""
    size = tuple(teacher[0].shape[-2:])
    return torch.cat([F.interpolate(-t * s, size=size, mode="bilinear", align_corners=False)
                      for t, s in zip(_normalised(teacher), _normalised(student))], dim=1)


class DeSTSegNet(FrozenPartNet):
    """Teacher, student, segmentation network.

    ``forward(images, target=None, segment=True)``: ``teacher`` = the teacher's features of
    ``target`` (default ``images``), ``student`` = the student's of ``images``, and when
    ``segment`` the ``segmentation`` probabilities on the stride-4 grid from the teacher's and the
    student's features of ``images`` (no student gradient: phase 2 trains the head alone). The
    student sees ``images`` normalised as the teacher does (ImageNet statistics for ResNet-18).
    """

    def __init__(self, teacher: Teacher, seg_width: int = 256):
        super().__init__()
        self.teacher = teacher
        self.student = Student(teacher.channels, signed=teacher.signed)
        self.segmentation = SegmentationNet(sum(teacher.channels), seg_width)

    def forward(self, images: torch.Tensor, target: torch.Tensor | None = None,
                segment: bool = True) -> dict[str, Any]:
        teacher = self.teacher(images if target is None else target)
        normalised = self.teacher.extractor.normalize(images).contiguous()  # the extractor hands out channels-last
        student = self.student(normalised, [tuple(f.shape[-2:]) for f in teacher])
        out: dict[str, Any] = {"teacher": teacher, "student": student}
        if segment:
            own = teacher if target is None else self.teacher(images)
            with torch.no_grad():
                features = segmentation_input(own, student)
            out["segmentation"] = self.segmentation(features)
        return out



# --------------------------------------------------------------------------------------------- losses
def student_losses(out: dict, batch_size: int) -> dict[str, torch.Tensor]:
    """Phase 1: ``cos`` = per sample the sum over levels of the mean over positions of ``1 - cos``;
    ``loss`` = ``batch_size`` x its batch mean, i.e. the official sum over a full batch (the engine
    backpropagates batch means)."""
    cos = sum(d.mean() for d in cosine_distances(out["teacher"], out["student"]))
    return {"loss": batch_size * cos, "cos": cos}


def segmentation_losses(out: dict, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Phase 2: focal (gamma 4, no class weights) + L1 between the stride-4 probabilities and the
    mask resized bilinearly to that grid and binarised at 0.5."""
    probs = out["segmentation"].float()
    target = (F.interpolate(mask.float(), size=tuple(probs.shape[-2:]), mode="bilinear",
                            align_corners=False) >= 0.5).float()
    focal = focal_loss(torch.cat([1 - probs, probs], dim=1), target, FOCAL_GAMMA)
    l1 = (probs - target).abs().mean()
    return {"loss": focal + l1, "focal": focal, "l1": l1}


def dest_map(out: dict, size: tuple[int, int]) -> torch.Tensor:
    """The secondary "DeST" map (B, H, W): the product over levels of ``1 - cos`` (bilinear to the
    finest level's grid), upsampled bilinearly to ``size``."""
    distances = cosine_distances(out["teacher"], out["student"])
    grid = tuple(distances[0].shape[-2:])
    product = torch.stack([F.interpolate(d, size=grid, mode="bilinear", align_corners=False)
                           for d in distances]).prod(0)
    return F.interpolate(product, size=size, mode="bilinear", align_corners=False)[:, 0]


class FullBatches(torch.utils.data.Dataset):
    """A pass over ``base`` without its incomplete last batch (the official ``drop_last``): the first
    ``len - len % batch`` items of a permutation seeded by ``(seed, epoch)``, so a different remainder
    is left out each pass. (The segmentation head's image-pooling BatchNorm cannot train on one sample.)"""

    def __init__(self, base: torch.utils.data.Dataset, batch: int, seed: int):
        self.base, self.seed = base, int(seed)
        n = len(base)
        self.length = n - n % batch if n >= batch else n
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)
        self.order = np.random.default_rng([self.seed, int(epoch)]).permutation(len(self.base))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        return self.base[int(self.order[index])]


# --------------------------------------------------------------------------------------------- phases
class _Phase:
    """One training phase as an engine Trainable: the student (phase 1) or the segmentation network
    (phase 2) trains, the other part is frozen (``requires_grad`` off, eval mode) so DDP sees only
    the parameters that receive gradients."""

    def __init__(self, method: DeSTSeg, name: str):
        self.method, self.name = method, name

    def trainable_module(self) -> DeSTSegNet:
        net = self.method._build()
        for part, on in ((net.student, self.name == "student"), (net.segmentation, self.name == "segmentation")):
            part.requires_grad_(on)
        return net

    def train_mode(self, module: DeSTSegNet) -> None:
        module.train()
        (module.segmentation if self.name == "student" else module.student).eval()

    def configure_optimizers(self, module: DeSTSegNet):
        m = self.method
        if self.name == "student":
            groups = [{"params": list(module.student.parameters()), "lr": m.student_lr}]
        else:
            groups = [{"params": list(module.segmentation.res.parameters()), "lr": m.seg_lr},
                      {"params": list(module.segmentation.head.parameters()), "lr": m.head_lr}]
        return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=m.momentum, weight_decay=m.weight_decay), None

    def training_step(self, module, batch: dict) -> dict[str, torch.Tensor]:
        if self.name == "student":
            return self.method.student_step(module, batch)
        return self.method.segmentation_step(module, batch)

    def validation_step(self, module, batch: dict) -> dict[str, torch.Tensor]:
        return self.training_step(module, batch)

    def checkpoint_state(self, module: DeSTSegNet) -> dict[str, torch.Tensor]:
        return module.trainable_state_dict()

    def load_checkpoint_state(self, module: DeSTSegNet, state: dict[str, torch.Tensor]) -> None:
        module.load_trainable_state_dict(state)


# --------------------------------------------------------------------------------------------- method
@register
class DeSTSeg(Method):
    """DeSTSeg (CVPR 2023): denoising student-teacher + segmentation, trained in two phases.

    Parameters
    ----------
    student_steps, seg_steps, batch_size:
        Official 1000 student steps, then 4000 segmentation steps, batch 32 (incomplete batches
        dropped). Each phase is one run of the training engine, in the work sub-folders
        ``student/`` and ``segmentation/``; the last step is kept.
    student_lr, seg_lr, head_lr, momentum, weight_decay:
        SGD: 0.4 for the student; 0.1 for the segmentation network's residual blocks and 0.01 for
        its ASPP head; momentum 0.9, weight decay 1e-4 (official).
    encoder, encoder_weights:
        The frozen teacher, ResNet-18 with its ImageNet file (``resnet18-f37072fd.pth``) by default.
        Without it, the offline EfficientNet-Lite0 (with a warning; the student decoder and the
        segmentation network are sized from its channels, and the saved configuration records it).
        ``encoder_weights="random"``: a random teacher (tests only).
    rotation:
        Rotation of the normal image before synthesis: ``none``, ``small`` (U(-5, 5) degrees),
        ``right`` (a multiple of 90 degrees, then U(-5, 5)), grey fill; ``mvtec`` = the official
        choice for the training images' MVTec AD category (none for other categories).
    seg_width:
        Width of the segmentation network (official 256; smaller for CPU budgets).
    textures:
        A texture folder (DTD's ``images``); ``None`` = procedural textures and other training images.
    map, topk:
        ``"segmentation"`` (official): the segmentation output upsampled bilinearly to the input;
        ``"dest"``: the product over levels of ``1 - cos`` between teacher and student. Image score =
        the mean of the ``topk`` largest map values (official 100).
    size, seed, device, amp, workers, resume, train_images:
        Input side (a multiple of 32; ``None`` = the training images' size), seed, device, float16
        autocast on CUDA, DataLoader workers, continue an interrupted fit, 0 = all training images
        else a seeded subset.
    """

    name = "destseg"
    OPTIONS = {
        "student_steps": Option(int, low=1),
        "seg_steps": Option(int, low=1),
        "batch_size": Option(int, low=2),
        "student_lr": Option(float, low=0, open_low=True),
        "seg_lr": Option(float, low=0, open_low=True),
        "head_lr": Option(float, low=0, open_low=True),
        "momentum": Option(float, low=0, high=1),
        "weight_decay": Option(float, low=0),
        "encoder": Option(str),
        "encoder_weights": Option(str, null=True),
        "rotation": Option(str, choices=(*IMAGE_ROTATIONS, "mvtec")),
        "seg_width": Option(int, low=8),
        "textures": Option(str, null=True),
        "map": Option(str, choices=MAPS, predict=True),
        "topk": Option(int, low=1, predict=True),
        "size": Option(int, low=STRIDE, multiple=STRIDE, null=True),
        "seed": Option(int, low=0),
        "device": Option(str, predict=True),
        "amp": Option(bool),
        "workers": Option(int, low=0),
        "resume": Option(bool),
        "train_images": Option(int, low=0),
    }

    def __init__(
        self,
        student_steps: int = 1000,
        seg_steps: int = 4000,
        batch_size: int = 32,
        student_lr: float = 0.4,
        seg_lr: float = 0.1,
        head_lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        encoder: str = PAPER_TEACHER,
        encoder_weights: str | None = "default",
        rotation: str = "none",
        seg_width: int = 256,
        textures: str | None = None,
        map: str = "segmentation",
        topk: int = 100,
        size: int | None = None,
        seed: int = 0,
        device: str = "auto",
        amp: bool = True,
        workers: int = 0,
        resume: bool = False,
        train_images: int = 0,
    ):
        self.student_steps = int(student_steps)
        self.seg_steps = int(seg_steps)
        self.batch_size = int(batch_size)
        self.student_lr = float(student_lr)
        self.seg_lr = float(seg_lr)
        self.head_lr = float(head_lr)
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.encoder = str(encoder)
        self.encoder_weights = encoder_weights
        self.rotation = str(rotation)
        self.seg_width = int(seg_width)
        self.textures = None if textures in (None, "") else str(textures)
        self.map = str(map)
        self.topk = int(topk)
        self.size = size
        self.seed = int(seed)
        self.device = str(device)
        self.amp = bool(amp)
        self.workers = int(workers)
        self.resume = bool(resume)
        self.train_images = int(train_images)
        self.net: DeSTSegNet | None = None
        self.history_: list[dict] = []
        #: The teacher actually built (after a fallback): saved in the config, never written into ``encoder``.
        self._encoder_used: str | None = None

    def _device(self) -> torch.device:
        return resolve_device(self.device)

    def _build(self) -> DeSTSegNet:
        if self.net is None:
            with seeded(self.seed):
                teacher = build_teacher(self.encoder, self.encoder_weights)
                self._encoder_used = teacher.name
                self.net = DeSTSegNet(teacher, self.seg_width)
            device = self._device()
            self.net.to(device)
            log.info("destseg: teacher %s (taps %s), student %.2f M, segmentation %.2f M parameters", teacher.name,
                     teacher.channels, sum(p.numel() for p in self.net.student.parameters()) / 1e6,
                     sum(p.numel() for p in self.net.segmentation.parameters()) / 1e6)
        return self.net

    def resolved_config(self) -> dict[str, Any]:
        """The teacher actually built, so that loading the run rebuilds the network its weights fit."""
        return {"encoder": self._encoder_used} if self._encoder_used is not None else {}

    # ------------------------------------------------------------------ training steps (one per phase)
    def student_step(self, module, batch: dict) -> dict[str, torch.Tensor]:
        """Phase 1: the student's features of the augmented image against the teacher's of the clean one."""
        return student_losses(module(batch["augmented"], batch["image"], segment=False), self.batch_size)

    def segmentation_step(self, module, batch: dict) -> dict[str, torch.Tensor]:
        """Phase 2: the segmentation of the augmented image against its mask."""
        return segmentation_losses(module(batch["augmented"]), batch["mask"])

    # ------------------------------------------------------------------ fit
    def _rotation_mode(self, train_set: torch.utils.data.Dataset) -> str:
        if self.rotation != "mvtec":
            return self.rotation
        return MVTEC_ROTATION.get(str(train_set[0].get("category", "")).lower(), "none")

    def fit(self, train_set: torch.utils.data.Dataset, val_set: torch.utils.data.Dataset | None = None) -> DeSTSeg:
        if len(train_set) == 0:
            raise ThreecadError("destseg.fit got no training images")
        shape = tuple(int(v) for v in train_set[0]["image"].shape[-2:])
        if shape[0] % STRIDE or shape[1] % STRIDE:
            raise ThreecadError(f"destseg needs image sides divisible by {STRIDE}, got {shape[1]}x{shape[0]}; "
                                "use --resize squash --size 256 (or 128, 320 ...)")
        self._build()
        base = train_subset(train_set, self.train_images, self.seed)
        rotation = self._rotation_mode(train_set)
        params = destseg_synthesis(rotation)
        bank = TextureBank(self.textures, images=base)
        validation = None
        if val_set is not None and len(val_set):
            validation = SyntheticAnomalyDataset(val_set, bank, seed=self.seed + 2, params=params)
        fingerprint = {"method": self.name, "encoder": self._encoder_used, "input_shape": list(shape),
                       "train_images": len(base), "rotation": rotation, "seg_width": self.seg_width,
                       "textures": self.textures, "momentum": self.momentum, "weight_decay": self.weight_decay}
        log.info("destseg: %d training images at %dx%d, %d + %d steps, rotation %s, textures: %s", len(base),
                 shape[1], shape[0], self.student_steps, self.seg_steps, rotation, bank.source)
        self.history_ = []
        phases = (("student", self.student_steps, {"student_lr": self.student_lr}),
                  ("segmentation", self.seg_steps, {"seg_lr": self.seg_lr, "head_lr": self.head_lr}))
        for k, (phase, steps, rates) in enumerate(phases):
            # Each phase draws its own anomalies and batch order (seed + k) and has its own checkpoint.
            data = FullBatches(SyntheticAnomalyDataset(base, bank, seed=self.seed + k, params=params),
                               self.batch_size, self.seed + k)
            settings = TrainSettings(iterations=steps, batch_size=self.batch_size, seed=self.seed + k, amp=self.amp,
                                     num_workers=self.workers)
            work = self.work_dir / phase if self.work_dir is not None else None
            rows = engine_fit(_Phase(self, phase), data, settings, self._device(), work_dir=work, resume=self.resume,
                              val_data=validation, collate=collate, desc=f"destseg {phase}",
                              fingerprint={**fingerprint, "phase": phase, **rates})
            self.history_ += [{"phase": phase, **row} for row in rows]
        self.net.eval()
        return self

    # ------------------------------------------------------------------ predict
    @torch.no_grad()
    def predict_batch(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        if self.net is None:
            raise ThreecadError("destseg is not fitted: call fit() or load a saved run")
        if images.ndim != 4 or images.shape[1] != 3:
            raise ThreecadError(f"expected images (B, 3, H, W), got {tuple(images.shape)}")
        size = tuple(images.shape[-2:])
        if size[0] % STRIDE or size[1] % STRIDE:
            raise ThreecadError(f"destseg takes image sides divisible by {STRIDE}, got {size[1]}x{size[0]}: "
                                "predict at the input size the run was trained with")
        return self.run_inference(images.to(self._device()))

    def inference_module(self) -> NetInference:
        """The network and its map (:meth:`_infer`) as one module."""
        return self.net_inference()

    def _infer(self, net: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores and maps: the segmentation head's map (or the DeST map), the score its top-``topk`` mean."""
        size = tuple(images.shape[-2:])
        out = net(images, segment=self.map == "segmentation")
        if self.map == "segmentation":
            maps = F.interpolate(out["segmentation"].float(), size=size, mode="bilinear", align_corners=False)[:, 0]
        else:
            maps = dest_map(out, size)
        return top_fraction_mean(maps, min(self.topk, size[0] * size[1]) / (size[0] * size[1])), maps

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.net is None:
            raise ThreecadError("destseg is not fitted: nothing to save")
        return {k: v.detach().cpu() for k, v in self.net.trainable_state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        net = self._build()
        if self._encoder_used != canonical_name(self.encoder):
            raise ThreecadError(f"this run was trained with the teacher {self.encoder}, which cannot be built here "
                                f"(got {self._encoder_used}): place its weight file (docs/backbones.md)")
        net.load_trainable_state_dict(state)
        net.eval()
