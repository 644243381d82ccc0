"""``tune run tad_torchtune.eval.eval_tad --config X`` lands here: torchtune 0.6.1 strips the last dotted part.

So ``python -m tad_torchtune.eval`` and the dotted ``tune run`` both run the ``eval_tad`` recipe.
"""

import sys

from tad_torchtune.eval.eval_tad import main

if __name__ == "__main__":
    sys.exit(main())
