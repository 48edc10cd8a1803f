"""Drop-in replacements for the contrastive losses of other code bases: change only the import line.

Each module takes its peer's exact signature, positional order and defaults, reproduces its edge cases
and DDP behaviour, and runs on fastcl's losses (``docs/migration.md`` lists what, if anything, differs):

==================================  =====================================================================
module                              replaces
==================================  =====================================================================
``fastcl.compat.supcontrast``       SupContrast's ``SupConLoss``
``fastcl.compat.open_clip``         open_clip's ``ClipLoss``, ``SigLipLoss``
``fastcl.compat.lightly``           lightly's ``NTXentLoss``, ``DCLLoss``, ``DCLWLoss``
``fastcl.compat.pml``               pytorch-metric-learning's ``NTXentLoss``, ``SupConLoss``, ``SelfSupervisedLoss``
``fastcl.compat.solo_learn``        solo-learn's ``simclr_loss_func``
``fastcl.compat.inf_cl``            Inf-CL's ``cal_inf_loss``, ``cal_ring_loss``, ``cal_flash_loss``
``fastcl.compat.directclr``         DirectCLR's ``infoNCE`` and its ``directclr`` / ``group`` modes
==================================  =====================================================================
"""

from fastcl.compat import directclr, inf_cl, lightly, open_clip, pml, solo_learn, supcontrast

__all__ = ["directclr", "inf_cl", "lightly", "open_clip", "pml", "solo_learn", "supcontrast"]
