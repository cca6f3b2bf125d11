"""Face decoder training stage (SPEC section 6): face features -> canonical faces, trained first.

`FaceDecoderModule` trains `s2f.decoder.FaceDecoder` on batches of `datamodules.faces`:

    L = texture_weight  * |texture - target texture|_1            (mean over pixels, channels)
      + landmark_weight * |landmarks - target landmarks|_2^2       (mean over points, x and y)
      + identity_weight * -cos(teacher(rendered face), input feature)   (VGG-Face teacher only)

The identity term needs a differentiable teacher: `identity_teacher="vggface:PATH"` loads
VGG-Face (frozen, kept out of the checkpoint: it is 0.5 GB and the decoder never needs it after
training). With `identity_teacher="dlib"` (the demo's features come from dlib's descriptor,
which cannot pass gradients) or None the term is off, and setup logs that once. Weights are [open] in the
paper; LANDMARK_WEIGHT scales landmark errors (~0.02 normalised units -> MSE ~4e-4) to the
size of the texture L1 (~0.05).

The learning rate follows a cosine from `lr` to zero over the run's step budget: with a fixed
budget, a decayed rate gives stable final weights (DESIGN, demo-world budget).

The checkpoint alone rebuilds the decoder (`load_decoder`): hyper-parameters name the preset
and feature dimension, and the mean landmarks (set from the training data in `setup`) are a
buffer of the decoder, saved with its weights.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.nn import functional as F

from s2f.decoder import FaceDecoder
from s2f.teacher import VGGFACE_IMAGE_SIZE, VGGFace, freeze

log = logging.getLogger(__name__)

TEXTURE_WEIGHT = 1.0
LANDMARK_WEIGHT = 100.0
IDENTITY_WEIGHT = 1.0
LEARNING_RATE = 1e-3
BETAS = (0.9, 0.999)
PREVIEW_FACES = 8  # faces per validation preview grid
PREVIEW_DIR = "previews"  # under the run directory
DECODER_PREFIX = "decoder."  # state-dict prefix of the decoder inside the module
VGGFACE_SPEC = "vggface:"


def preview_grid(rows: list[torch.Tensor]) -> torch.Tensor:
    """Rows of images (N, 3, S, S) in [0, 1] -> one grid (3, R * S, N * S)."""
    stacked = torch.stack([r.detach().float().cpu().clamp(0, 1) for r in rows])  # (R, N, 3, S, S)
    count, n, c, s, _ = stacked.shape
    return stacked.permute(2, 0, 3, 1, 4).reshape(c, count * s, n * s)  # (3, R * S, N * S)


def save_png(grid: torch.Tensor, path: Path) -> Path:
    """(3, H, W) in [0, 1] -> PNG, written under a temporary name and renamed."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)  # (H, W, 3)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(pixels).save(tmp, format="PNG")
    tmp.replace(path)
    return path


def cosine_schedule(total_steps: int):
    """lr factor at step t: cosine from 1 to 0 over total_steps; constant 1 for an open run."""
    if not 0 < total_steps < math.inf:
        return lambda step: 1.0
    return lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))


class FaceDecoderModule(pl.LightningModule):
    """Trains a FaceDecoder on face features, landmarks and textures.

    Args:
        preset: decoder preset ("paper" 224 px / 4096-D, "large" 224 px, "medium" 128 px,
            "small" 64 px, "tiny" 32 px).
        in_dim: face-feature dimension D (VGG-Face fc7 4096, dlib descriptor 128).
        identity_teacher: "vggface:PATH" turns the identity loss on; "dlib" or None leave it
            off (named apart from Speech2Face's `teacher`, a classifier file path).
        texture_weight, landmark_weight, identity_weight: loss weights (module docstring).
        lr, betas, weight_decay: Adam (decayed to zero by a cosine over the step budget).
        preview_faces: faces shown in the validation preview grid.
    """

    def __init__(
        self,
        preset: str = "small",
        in_dim: int = 128,
        identity_teacher: str | None = None,
        texture_weight: float = TEXTURE_WEIGHT,
        landmark_weight: float = LANDMARK_WEIGHT,
        identity_weight: float = IDENTITY_WEIGHT,
        lr: float = LEARNING_RATE,
        betas: tuple[float, float] = BETAS,
        weight_decay: float = 0.0,
        preview_faces: int = PREVIEW_FACES,
    ):
        super().__init__()
        spec = identity_teacher
        if spec not in (None, "dlib") and not spec.startswith(VGGFACE_SPEC):
            raise ValueError(
                f"model.identity_teacher={spec!r}: use 'dlib', None, or "
                "'vggface:/path/vgg_face_dag.pth'"
            )
        self.save_hyperparameters()
        self.decoder = FaceDecoder.from_preset(preset, in_dim=in_dim)
        # The frozen VGG-Face sits in a plain dict: not a submodule, so not in checkpoints.
        self._frozen: dict[str, VGGFace] = {}

    @property
    def identity_loss_on(self) -> bool:
        spec = self.hparams.identity_teacher
        return spec is not None and spec.startswith(VGGFACE_SPEC)

    # -- setup ----------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        if stage != "fit":
            return  # evaluation uses the mean landmarks saved in the checkpoint
        self._take_geometry(self.trainer.datamodule)
        if self.identity_loss_on:
            path = self.hparams.identity_teacher[len(VGGFACE_SPEC):]
            self._frozen["vggface"] = freeze(VGGFace.load(path))
        else:
            log.warning(
                "identity loss off: teacher %r is not differentiable (only VGG-Face is); "
                "training with texture and landmark losses only", self.hparams.identity_teacher
            )

    def _take_geometry(self, datamodule) -> None:
        mean = getattr(datamodule, "mean_landmarks", None)
        if mean is None:
            raise ValueError(
                "FaceDecoderModule needs a datamodule with mean_landmarks (68, 2), e.g. "
                "datamodules.faces.FaceShardDataModule"
            )
        size, wanted = datamodule.hparams.image_size, self.decoder.config.image_size
        if size != wanted:
            raise ValueError(
                f"data.image_size={size}, but decoder preset {self.hparams.preset!r} draws "
                f"{wanted} x {wanted} faces; set data.image_size: {wanted}"
            )
        self.decoder.set_mean_landmarks(mean.to(self.device))

    def on_fit_start(self) -> None:
        for name, model in self._frozen.items():
            self._frozen[name] = model.to(self.device)

    # -- losses ---------------------------------------------------------------------------------

    def identity_loss(self, image: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """-cos(VGG-Face fc7 of the rendered faces (B, 3, S, S) in [0, 1], input features)."""
        size = (VGGFACE_IMAGE_SIZE, VGGFACE_IMAGE_SIZE)
        pixels = F.interpolate(image, size=size, mode="bilinear", align_corners=False) * 255
        rendered = self._frozen["vggface"](pixels)  # (B, 4096)
        return -F.cosine_similarity(rendered, features, dim=1).mean()

    def terms(self, batch: dict, out: dict) -> dict[str, torch.Tensor]:
        hp = self.hparams
        terms = {
            "texture_l1": F.l1_loss(out["texture"], batch["texture"]),
            "landmark_mse": F.mse_loss(out["landmarks"], batch["landmarks"]),
        }
        total = hp.texture_weight * terms["texture_l1"] + hp.landmark_weight * terms["landmark_mse"]
        if self.identity_loss_on:
            terms["identity"] = self.identity_loss(out["image"], batch["fc7"])
            total = total + hp.identity_weight * terms["identity"]
        terms["total"] = total
        return terms

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.decoder(features)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        terms = self.terms(batch, self(batch["fc7"]))
        size = len(batch["key"])
        for name, value in terms.items():
            self.log(f"train/{name}", value, prog_bar=name == "total", batch_size=size)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=size)
        return terms["total"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        out = self(batch["fc7"])
        for name, value in self.terms(batch, out).items():
            self.log(f"val/{name}", value, sync_dist=True, batch_size=len(batch["key"]))
        if batch_idx == 0 and self.trainer.is_global_zero:
            self._preview(batch, out)

    # -- previews -------------------------------------------------------------------------------

    def _preview(self, batch: dict, out: dict) -> None:
        """Grid rows: target face, decoded face, target texture, decoded texture."""
        n = self.hparams.preview_faces
        grid = preview_grid([batch["image"][:n], out["image"][:n],
                             batch["texture"][:n], out["texture"][:n]])  # fmt: skip
        name = f"step{self.global_step:07d}.png"
        save_png(grid, Path(self.trainer.default_root_dir) / PREVIEW_DIR / name)
        for logger in self.loggers:
            if hasattr(logger, "log_image"):  # W&B
                logger.log_image(key="val/faces", images=[grid.permute(1, 2, 0).numpy()],
                                 step=self.global_step)  # fmt: skip
            elif hasattr(getattr(logger, "experiment", None), "add_image"):  # TensorBoard
                logger.experiment.add_image("val/faces", grid, self.global_step)

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.Adam(
            self.decoder.parameters(), lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay
        )
        factor = cosine_schedule(self.trainer.estimated_stepping_batches)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def load_decoder(ckpt: str | Path, map_location: str | torch.device = "cpu") -> FaceDecoder:
    """The frozen, eval-mode FaceDecoder of a FaceDecoderModule checkpoint (no other file)."""
    path = Path(ckpt)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such decoder checkpoint; train one with "
                                "`s2f fit --config configs/decoder-demo.yaml`")
    state = torch.load(path, map_location=map_location, weights_only=True)
    hp = state.get("hyper_parameters", {})
    if "preset" not in hp or "in_dim" not in hp:
        raise ValueError(f"{path}: not a FaceDecoderModule checkpoint (no preset / in_dim)")
    decoder = FaceDecoder.from_preset(hp["preset"], in_dim=hp["in_dim"])
    weights = {
        name[len(DECODER_PREFIX):]: value
        for name, value in state["state_dict"].items()
        if name.startswith(DECODER_PREFIX)
    }
    decoder.load_state_dict(weights, strict=True)
    return freeze(decoder)
