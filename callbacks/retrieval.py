"""Retrieval metrics during validation, over all ranks, and a grid of retrieved faces in W&B.

`RetrievalMetrics` takes the v_s that `validation_step` computes (a forward hook on the module,
so it costs no extra forward pass) and the batch's `fc7`, up to `max_items` clips in all, split
evenly over the ranks. At the end of the validation epoch it gathers them from every rank (ranks
may hold different counts), and every rank computes the same numbers with `s2f.metrics` and logs:

- `{prefix}/recall@k` for each k, and `{prefix}/chance@k` = k / gallery size;
- `{prefix}/angle`: mean angle in degrees between v_s and v_f;
- `{prefix}/gallery`: the gallery size (the gathered clip count).

The gallery is the gathered clips' true-face features; each clip's v_s is a query whose match is
its own face. With a `WandbLogger` (and outside the sanity check) it also logs `{prefix}/grid`:
for a few queries, the true face then the top retrieved faces, the true one framed in green. Faces
come from the batch's `"face"` list of face.jpg bytes when the batch has one, otherwise from the
split folder `face_shards` (read by key); the grid needs the batch's `"key"` list.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger

from s2f import metrics as m
from s2f.module import gather_rows

DEFAULT_MAX_ITEMS = 1_000  # gallery cap: keeps the epoch-end cost and the gathers small
DEFAULT_KS = (1, 5, 10)
GRID_QUERIES = 4
GRID_TOP = 5
TILE = 96  # pixels per face in the grid
FRAME = 4  # pixels of the green frame around the true face
TRUE_COLOUR = (26, 152, 80)
BLANK_COLOUR = (200, 200, 200)  # a face we could not find


@dataclass
class Collected:
    """What one rank kept from its validation batches."""

    v_s: list[torch.Tensor] = field(default_factory=list)  # each (B, D)
    v_f: list[torch.Tensor] = field(default_factory=list)  # each (B, D)
    keys: list[str] = field(default_factory=list)
    faces: dict[str, bytes] = field(default_factory=dict)  # key -> face.jpg

    @property
    def count(self) -> int:
        return sum(len(rows) for rows in self.v_s)


def gather_objects(trainer: pl.Trainer, obj: Any) -> list[Any]:
    """Every rank's `obj` in rank order (picklable objects; one element without DDP)."""
    if trainer.world_size == 1 or not torch.distributed.is_initialized():
        return [obj]
    out: list[Any] = [None] * trainer.world_size
    torch.distributed.all_gather_object(out, obj)
    return out


def compose_grid(rows: Sequence[Sequence[tuple[bytes | None, bool]]], tile: int = TILE):
    """One PIL image: a line per query of (face.jpg bytes, is_true) tiles, the true ones framed."""
    from PIL import Image

    width = max(len(row) for row in rows)
    canvas = Image.new("RGB", (width * tile, len(rows) * tile), "white")
    for y, row in enumerate(rows):
        for x, (jpeg, is_true) in enumerate(row):
            inner = tile - 2 * FRAME
            face = (Image.open(io.BytesIO(jpeg)).convert("RGB").resize((inner, inner))
                    if jpeg is not None else Image.new("RGB", (inner, inner), BLANK_COLOUR))
            cell = Image.new("RGB", (tile, tile), TRUE_COLOUR if is_true else "white")
            cell.paste(face, (FRAME, FRAME))
            canvas.paste(cell, (x * tile, y * tile))
    return canvas


class RetrievalMetrics(pl.Callback):
    """Recall@K, chance and angle on the validation split (see the module docstring).

    Args:
        max_items: clips in the gallery at most, over all ranks.
        ks: recall cut-offs.
        grid_queries, grid_top: queries in the W&B grid and retrieved faces per query.
        face_shards: split folder to read face.jpg from when batches carry no "face".
        prefix: metric name prefix.
        seed: which queries the grid shows.
    """

    def __init__(
        self, max_items: int = DEFAULT_MAX_ITEMS, ks: Sequence[int] = DEFAULT_KS,
        grid_queries: int = GRID_QUERIES, grid_top: int = GRID_TOP, face_shards: str | None = None,
        prefix: str = "val_retrieval", seed: int = 0,
    ):
        if max_items < 1:
            raise ValueError(f"RetrievalMetrics: max_items={max_items}, need at least 1")
        self.max_items, self.ks, self.prefix, self.seed = max_items, tuple(ks), prefix, seed
        self.grid_queries, self.grid_top, self.face_shards = grid_queries, grid_top, face_shards
        self._collected = Collected()
        self._last: torch.Tensor | None = None
        self._hook = None

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._collected, self._last = Collected(), None
        self._hook = pl_module.register_forward_hook(self._capture)

    def _capture(self, module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> None:
        self._last = output

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
        batch_idx: int, dataloader_idx: int = 0,
    ) -> None:
        v_s, self._last = self._last, None
        room = self.max_items // trainer.world_size - self._collected.count
        if v_s is None or room <= 0 or not isinstance(batch, dict) or "fc7" not in batch:
            return
        n = min(room, len(v_s))
        self._collected.v_s.append(v_s[:n].detach().float())  # (n, D)
        self._collected.v_f.append(batch["fc7"][:n].detach().float())  # (n, D)
        if "key" in batch:
            keys = list(batch["key"][:n])
            self._collected.keys += keys
            self._collected.faces.update(zip(keys, batch.get("face", [])[:n]))

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        mine = self._collected
        # A rank that collected nothing still joins the gathers, with (0, D) rows.
        empty = torch.zeros(0, pl_module.hparams.feature_dim, device=pl_module.device)
        v_s = gather_rows(pl_module, torch.cat(mine.v_s) if mine.v_s else empty)  # (N, D)
        v_f = gather_rows(pl_module, torch.cat(mine.v_f) if mine.v_f else empty)  # (N, D)
        if len(v_s) == 0:
            return
        recall = m.retrieval_recall(v_s, v_f, ks=self.ks)
        values = {f"{self.prefix}/angle": m.feature_similarity(v_s, v_f)["angle_mean"],
                  f"{self.prefix}/gallery": float(len(v_s))}
        for k in self.ks:
            values[f"{self.prefix}/recall@{k}"] = recall[f"recall@{k}"]
            values[f"{self.prefix}/chance@{k}"] = m.chance_recall(k, len(v_s))
        # Every rank holds the same gathered rows, so the values agree without a further sync.
        for name, value in values.items():
            pl_module.log(name, value)
        wandb = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        if wandb and not trainer.sanity_checking:
            self._log_grid(trainer, wandb, v_s, v_f)

    def _log_grid(self, trainer: pl.Trainer, loggers: list[WandbLogger], v_s: torch.Tensor,
                  v_f: torch.Tensor) -> None:
        from s2f.evaluate import retrieval_grid

        keys = [key for rank_keys in gather_objects(trainer, self._collected.keys) for key in rank_keys]
        if len(keys) != len(v_s):
            return  # batches without "key": faces cannot be matched to rows
        grid = retrieval_grid(v_s, v_f, self.grid_queries, self.grid_top, self.seed)
        wanted = sorted({keys[i] for q, top in grid for i in [q, *top]})
        faces = self._faces(trainer, wanted)
        if not faces:
            return
        image = compose_grid([[(faces.get(keys[i]), i == q) for i in [q, *top]] for q, top in grid])
        caption = "true face, then the top retrieved (true one framed in green)"
        for logger in loggers:
            logger.log_image(f"{self.prefix}/grid", [image], step=trainer.global_step, caption=[caption])

    def _faces(self, trainer: pl.Trainer, wanted: list[str]) -> dict[str, bytes]:
        """face.jpg of the wanted keys: from the batches of every rank, else from face_shards."""
        held = {key: self._collected.faces[key] for key in wanted if key in self._collected.faces}
        faces = {key: jpeg for part in gather_objects(trainer, held) for key, jpeg in part.items()}
        if not faces and self.face_shards is not None and trainer.is_global_zero:
            from s2f.evaluate import read_faces

            faces = read_faces(self.face_shards, wanted)
        return faces
