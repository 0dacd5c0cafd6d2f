"""Positional calibration of patch-score maps: the mean score a normal image gets at each place.

Normal patches are not equally far from a memory bank everywhere: on magnetic tiles, held-out normal
images score about 50 % higher near the image border than in the middle, and those border scores
outrank real defects. :class:`PositionalBaseline` is fitted on the patch-score maps of normal images
that were scored as unseen (PatchCore scores them leave-one-out) and subtracted from every map. It is
centred on zero, so only the differences between places move a map.

One grid (squashed inputs): one value per grid cell. Several grids (``--resize aspect``, native
sizes): cell ``(i, j)`` of two images lies at different relative places, while the bias sits at a
fixed distance from the border, so the scores are averaged by distance to the nearest top/bottom
and left/right border instead (:func:`border_table`), each clipped to ``limit`` cells, and any grid
looks its cells up there.
"""

from __future__ import annotations

import torch

from threecad.errors import ThreecadError
from threecad.maps.postprocess import upsample_maps

#: Border distances (in patch cells) told apart; farther cells share one value. 8 cells is 64 px at
#: stride 8, where the magnetic-tile bias has faded.
BORDER_CELLS = 8


def border_distances(grid: tuple[int, int], limit: int = BORDER_CELLS) -> tuple[torch.Tensor, torch.Tensor]:
    """Distance of each row (column) of a ``grid`` to the nearer top/bottom (left/right) border, at most ``limit``."""
    rows, cols = (torch.minimum(torch.arange(n), torch.arange(n).flip(0)).clamp(max=limit) for n in grid)
    return rows, cols


def border_table(maps: list[torch.Tensor], limit: int = BORDER_CELLS) -> torch.Tensor:
    """Mean of ``maps`` (each (h, w), any sizes) per (row, column) border distance: (limit + 1, limit + 1).

    A pair of distances no map reaches (a grid narrower than ``2 * limit`` cells everywhere) takes
    the value of the nearest pair that was seen, so any grid can be looked up.
    """
    total = torch.zeros(limit + 1, limit + 1, dtype=torch.float64)
    count = torch.zeros_like(total)
    for m in maps:
        rows, cols = border_distances(tuple(m.shape), limit)
        index = (rows[:, None] * (limit + 1) + cols[None, :]).flatten()
        total.view(-1).index_add_(0, index, m.flatten().double())
        count.view(-1).index_add_(0, index, torch.ones(index.numel(), dtype=torch.float64))
    seen = count > 0
    table = torch.where(seen, total / count.clamp(min=1), torch.zeros_like(total))
    if not seen.all():
        pairs = seen.nonzero().double()
        for a, b in (~seen).nonzero().tolist():
            nearest = pairs[(pairs - torch.tensor([a, b], dtype=torch.float64)).abs().sum(1).argmin()].long()
            table[a, b] = table[nearest[0], nearest[1]]
    return table.float()


class PositionalBaseline:
    """The mean normal score by place, centred on zero; ``correction(grid)`` is what a map of that grid loses.

    ``by_position`` (h, w): one value per cell of the single grid it was fitted on, resized
    (bilinear) for other grids. ``by_border`` (limit + 1, limit + 1): one value per pair of border
    distances (:func:`border_table`). Exactly one of them is set.
    """

    def __init__(self, by_position: torch.Tensor | None = None, by_border: torch.Tensor | None = None):
        if (by_position is None) == (by_border is None):
            raise ThreecadError("a positional baseline holds either a per-position map or a border table")
        for key, value in (("position_baseline", by_position), ("border_baseline", by_border)):
            if value is not None and value.ndim != 2:
                raise ThreecadError(f"PatchCore {key!r} must be a 2-D tensor")
        if by_border is not None and by_border.shape[0] != by_border.shape[1]:
            raise ThreecadError("PatchCore 'border_baseline' must be square (one row and column per border distance)")
        self.by_position = None if by_position is None else by_position.float()
        self.by_border = None if by_border is None else by_border.float()

    @classmethod
    def fit(cls, maps: list[torch.Tensor], limit: int | None = None) -> PositionalBaseline:
        """From the (h, w) score maps of normal images scored as unseen; ``limit``: :data:`BORDER_CELLS`."""
        limit = BORDER_CELLS if limit is None else limit
        level = float(torch.cat([m.flatten() for m in maps]).mean())
        if len({tuple(m.shape) for m in maps}) == 1:
            return cls(by_position=torch.stack(maps).mean(0) - level)
        return cls(by_border=border_table(maps, limit) - level)

    @property
    def span(self) -> float:
        table = self.by_position if self.by_position is not None else self.by_border
        return float(table.max() - table.min())

    def correction(self, grid: tuple[int, int], device: torch.device) -> torch.Tensor:
        """(h, w) values to subtract from a score map of that grid."""
        if self.by_border is not None:
            rows, cols = border_distances(grid, len(self.by_border) - 1)
            return self.by_border.to(device)[rows[:, None].to(device), cols[None, :].to(device)]
        return upsample_maps(self.by_position.to(device)[None], grid, 0.0)[0]

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.by_position is not None:
            return {"position_baseline": self.by_position.detach().cpu()}
        return {"border_baseline": self.by_border.detach().cpu()}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> PositionalBaseline | None:
        """The baseline held in a saved state, or ``None`` when it holds none."""
        position, border = state.get("position_baseline"), state.get("border_baseline")
        if position is None and border is None:
            return None
        return cls(by_position=position, by_border=border)
