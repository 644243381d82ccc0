"""``python -m tad_torchtune.recipes`` runs the ``knowledge_distillation_tad`` recipe.

torchtune 0.6.1's ``tune run tad_torchtune.recipes.kd_tad ...`` strips ``.kd_tad`` as if it were a file
extension and runs this module (single process via ``runpy``, ``--nproc_per_node N`` via ``torchrun -m``),
so the user's dotted command and the module form behave the same.
"""

import sys

from tad_torchtune.recipes.kd_tad import main

if __name__ == "__main__":
    sys.exit(main())
