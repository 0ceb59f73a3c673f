"""dino_research: DINO (self-distillation with no labels, Caron et al. 2021) as a research library.

Importing a subpackage registers its components: ``dino_research.modeling`` (backbones, heads,
losses, EMA rules, meta-architectures), ``dino_research.data`` (augmentations, datasets),
``dino_research.solver`` (schedules, optimizers).
"""

__version__ = "0.1.0"
