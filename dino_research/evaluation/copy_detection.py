"""Copy detection on Copydays "strong", the DINO paper's protocol (Sec. 4.2), as DINO's
``eval_copy_detection.py`` runs it.

Each strongly edited copy (cropped, rotated, repainted...) queries a database of the original
photos, optionally mixed with distractor images. An image is described by the final-normed [CLS]
token concatenated with the GeM-pooled (p = 4) patch tokens of a ViT; features are optionally
PCA-whitened with a transform learned on other images, L2-normalized and compared by cosine
similarity. A query scores the average precision of its originals among its 20 nearest database
images; the mean over queries is the reported mAP. ``tools/eval_copy_detection.py`` runs it.

Layout (the two Copydays folders the strong subset uses; names as Copydays ships them)::

    ROOT/original/NAME.jpg   the database photos (157 in Copydays)
    ROOT/strong/NAME.jpg     the queries (229 in Copydays); a query's originals are the originals whose
                             names share its first 4 characters (its block, e.g. 2000xx.jpg)

Shapes: ``Q`` queries, ``N`` database images (originals then distractors), ``D`` backbone width;
features are (., 2D).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision import transforms

from ..data import DatasetError
from ..data.datasets import load_image
from ..utils.errors import UserError
from .attention import crop_to_patch_multiple
from .features import extract
from .retrieval import compute_ap

__all__ = ["COPYDAYS_LAYOUT", "TOP_K", "ClsGeMFeatures", "CopydaysStrong", "ImageListDataset", "apply_whitening",
           "cls_gem_features", "copy_detection_map", "extract_copy_features", "learn_whitening",
           "list_image_files", "load_copydays_strong", "search"]

logger = logging.getLogger("dino_research")

COPYDAYS_LAYOUT = ("expected ROOT/original/*.jpg (the database photos) and ROOT/strong/*.jpg (the strong copies), "
                   "a copy's originals sharing the first 4 characters of its file name, as Copydays ships them "
                   "(https://lear.inrialpes.fr/~jegou/data.php#copydays)")
# The neighbours a query's AP is computed from (DINO's similarity.topk(20)).
TOP_K = 20
# GeM exponent of the patch-token pooling (DINO: "GeM with exponent 4").
GEM_P = 4.0
# File types of distractor and whitening folders: DINO's is_image_file list (here in any case).
IMAGE_FILE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


# ------------------------------------------------------------------------------------ data
@dataclass
class CopydaysStrong:
    """Copydays' strong subset: ``originals`` (database paths, sorted), ``queries`` (strong paths,
    sorted) and ``positives``: for each query, the indices into ``originals`` of its originals."""

    root: str
    originals: list
    queries: list
    positives: list


def _jpg_names(folder: str) -> list:
    # As DINO's get_block_filenames: the names ending in ".jpg", sorted.
    return sorted(name for name in os.listdir(folder) if name.endswith(".jpg"))


def load_copydays_strong(root: str) -> CopydaysStrong:
    """The strong subset of the Copydays folder ``root`` (see the module docstring for the layout).

    Raises:
        DatasetError: a folder is missing or holds no ``.jpg``, or a copy has no original of its
            block, naming the path and the expected layout.
    """
    names = {}
    for block in ("original", "strong"):
        folder = os.path.join(root, block)
        if not os.path.isdir(folder):
            raise DatasetError(f"Copydays: {folder} is not a folder; {COPYDAYS_LAYOUT}")
        names[block] = _jpg_names(folder)
        if not names[block]:
            raise DatasetError(f"Copydays: {folder} holds no .jpg file; {COPYDAYS_LAYOUT}")
    originals, strong = names["original"], names["strong"]
    # DINO's rule: a copy and its original share the 4-character block prefix of their names.
    positives = [[j for j, original in enumerate(originals) if original[:4] == query[:4]] for query in strong]
    orphans = [query for query, pos in zip(strong, positives) if not pos]
    if orphans:
        raise DatasetError(f"Copydays: {len(orphans)} copies in {os.path.join(root, 'strong')} have no original "
                           f"with the same first 4 characters, e.g. {', '.join(orphans[:3])}; {COPYDAYS_LAYOUT}")
    if (len(originals), len(strong)) != (157, 229):
        logger.warning("Copydays strong has 157 originals and 229 copies; %s holds %d and %d: results are not "
                       "comparable with the paper's", root, len(originals), len(strong))
    return CopydaysStrong(root=root, originals=[os.path.join(root, "original", n) for n in originals],
                          queries=[os.path.join(root, "strong", n) for n in strong], positives=positives)


def list_image_files(folder: str, what: str = "image folder") -> list:
    """The image files directly inside ``folder`` (DINO's extensions, any case), sorted.

    Raises:
        DatasetError: ``folder`` is not a folder or holds no image; ``what`` names its role.
    """
    if not os.path.isdir(folder):
        raise DatasetError(f"{what} {folder} is not a folder; expected a folder of image files "
                           f"({', '.join(IMAGE_FILE_EXTENSIONS)})")
    paths = [os.path.join(folder, n) for n in sorted(os.listdir(folder))
             if n.lower().endswith(IMAGE_FILE_EXTENSIONS) and not n.startswith(".")]
    if not paths:
        raise DatasetError(f"{what} {folder} holds no image file ({', '.join(IMAGE_FILE_EXTENSIONS)})")
    return paths


class ImageListDataset(Dataset):
    """Images of a list of paths, read as stored (no EXIF rotation, as DINO), resized to a square
    ``imsize`` x ``imsize`` (bicubic, aspect ratio not kept: DINO's ``Resize((imsize, imsize),
    interpolation=3)``) and normalized with ``mean``/``std``. Items: ``(image (3, imsize, imsize), index)``."""

    def __init__(self, paths: Sequence[str], *, imsize: int, mean: Sequence[float], std: Sequence[float]):
        if imsize < 1:
            raise ValueError(f"imsize must be positive, got {imsize}")
        self.paths = list(paths)
        self.transform = transforms.Compose([
            transforms.Resize((imsize, imsize), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        return self.transform(load_image(self.paths[index], exif_transpose=False)), index


# ------------------------------------------------------------------------------------ features
def cls_gem_features(backbone: nn.Module, images: torch.Tensor, p: float = GEM_P) -> torch.Tensor:
    """Images (B, 3, H, W) -> (B, 2D): the last block's [CLS] token and its GeM-pooled patch tokens.

    As DINO's copy-detection ``extract_features``: the tokens of ``get_intermediate_layers(x, n=1)``
    (final norm applied), patch tokens clamped at 1e-6 (GeM needs positive values), averaged as
    ``mean(t^p)^(1/p)`` over the patch grid, then concatenated after the [CLS] token. Not normalized:
    whitening comes first. Pixels past the last whole patch are dropped, as DINO's strided patch
    embedding does.
    """
    images = crop_to_patch_multiple(images, backbone.patch_size)
    tokens = backbone.get_intermediate_layers(images, n=1)[0]  # (B, 1 + h*w, D)
    cls_token, patches = tokens[:, 0], tokens[:, 1:]
    gem = patches.clamp(min=1e-6).pow(p).mean(dim=1).pow(1.0 / p)  # (B, D)
    return torch.cat([cls_token, gem], dim=1)


class ClsGeMFeatures(nn.Module):
    """:func:`cls_gem_features` of a wrapped ViT as a module (so extraction sets eval mode).

    Raises:
        UserError: ``backbone`` is not a ViT with ``get_intermediate_layers`` and an int ``patch_size``.
    """

    def __init__(self, backbone: nn.Module, p: float = GEM_P):
        super().__init__()
        if not (callable(getattr(backbone, "get_intermediate_layers", None))
                and isinstance(getattr(backbone, "patch_size", None), int)):
            raise UserError(f"copy detection pools a ViT's patch tokens (vit_tiny, vit_small, vit_base); "
                            f"a {type(backbone).__name__} has no get_intermediate_layers/patch_size")
        self.backbone, self.p = backbone, p

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 2D)."""
        return cls_gem_features(self.backbone, images, self.p)


def extract_copy_features(backbone: nn.Module, paths: Sequence[str], *, imsize: int, mean: Sequence[float],
                          std: Sequence[float], batch_size: int, device, num_workers: int = 0,
                          progress: bool = True) -> torch.Tensor:
    """:func:`cls_gem_features` (len(paths), 2D) of the images at ``paths``, in order, on every rank
    (:func:`~dino_research.evaluation.features.extract`, sharded over the ranks, not normalized)."""
    dataset = ImageListDataset(paths, imsize=imsize, mean=mean, std=std)
    (features,), indices = extract([ClsGeMFeatures(backbone)], dataset, batch_size=batch_size, device=device,
                                   num_workers=num_workers, progress=progress, normalize=False, gather=True,
                                   rows=True)
    assert torch.equal(indices, torch.arange(len(dataset))), "features are not in dataset order"
    return features


# ------------------------------------------------------------------------------------ whitening
def learn_whitening(features: torch.Tensor, centered: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """PCA whitening learned on ``features`` (M, K): ``(mean (K,), projection (K, K))``.

    ``apply_whitening(features, mean, projection)`` then has the identity covariance: with the
    eigendecomposition ``C = V diag(d) V^T`` of the covariance ``C`` of the centered features, the
    projection is ``diag(d^-1/2) V^T``, components by decreasing eigenvalue (DINO's ``utils.PCA``
    with ``whit=0.5``, every dimension kept). Eigenvalues below ``1e-5`` times the largest are raised
    to that floor, as DINO does, so directions the data does not span (M < K) are amplified by a
    bounded factor; the identity then holds on the spanned subspace. Computed in float64.

    ``centered=False`` reproduces DINO's script exactly: it takes ``C = F^T F / M`` of the
    *uncentered* features (the mean is still subtracted before projecting), which leaves the mean
    direction under-weighted.
    """
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"whitening needs features (M, K) with M >= 2, got {tuple(features.shape)}")
    x = features.double()
    mean = x.mean(dim=0)
    centered_x = x - mean if centered else x
    covariance = centered_x.T @ centered_x / x.shape[0]
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
    eigenvalues = eigenvalues.clamp(min=float(eigenvalues.max()) * 1e-5)
    order = torch.argsort(eigenvalues, descending=True)
    projection = torch.diag(eigenvalues[order].rsqrt()) @ eigenvectors[:, order].T
    return mean.float(), projection.float()


def apply_whitening(features: torch.Tensor, mean: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """Features (M, K) -> whitened (M, K): ``(features - mean) @ projection^T``."""
    return (features - mean) @ projection.T


# ------------------------------------------------------------------------------------ search and metric
def search(queries: torch.Tensor, database: torch.Tensor, k: int = TOP_K) -> torch.Tensor:
    """Indices (Q, min(k, N)) of the database rows most cosine-similar to each query, best first.
    Both are L2-normalized here (after any whitening, as DINO)."""
    similarity = F.normalize(queries.float(), dim=1) @ F.normalize(database.float(), dim=1).T  # (Q, N)
    return similarity.topk(min(k, database.shape[0]), dim=1, largest=True, sorted=True).indices


def copy_detection_map(indices, positives: Sequence[Sequence[int]]) -> tuple[float, list]:
    """``(mAP, aps)`` of a search, fractions: DINO's ``eval_result`` for the strong block.

    ``indices`` (Q, k): retrieved database indices per query, best first; ``positives``: Q lists of
    the database indices that are a query's originals. A query's AP is
    :func:`~dino_research.evaluation.retrieval.compute_ap` (the Holidays trapezoid rule DINO's
    ``score_ap_from_ranks_1`` implements, the same formula) of the ranks at which its originals were
    retrieved, out of all its originals: an original outside the top k counts as missed. The mAP
    averages over every query.
    """
    indices = torch.as_tensor(indices)
    if indices.ndim != 2 or indices.shape[0] != len(positives):
        raise ValueError(f"indices must be (Q, k) with Q = {len(positives)} queries, got {tuple(indices.shape)}")
    aps = []
    for retrieved, pos in zip(indices.tolist(), positives):
        pos = set(pos)
        if not pos:
            raise ValueError("every query needs at least one positive")
        aps.append(compute_ap([rank for rank, index in enumerate(retrieved) if index in pos], len(pos)))
    return sum(aps) / len(aps), aps
