"""Model builders, HF checkpoint conversion, student-from-teacher init, HF export and the memory plan.

Every builder here is usable from YAML by ``_component_`` path, e.g.
``model._component_: tad_torchtune.models.phi2_2_7b``; checkpoints load with
``checkpointer._component_: tad_torchtune.models.HFCheckpointer`` (torchtune's HF checkpointer plus
``model_type: PHI2``, ``QWEN3`` and a corrected ``GEMMA2``). ``tad-tune validate``'s model checks (built on the
meta device, sizes that fit each other) are in :mod:`.checks`. See ``docs/models.md``.
"""

from tad_torchtune.models.builders import (
    gemma2_2b,
    gemma2_9b,
    llama2_7b,
    llama3_1_8b,
    llama3_2_1b,
    phi2_2_7b,
    phi3_medium,
    phi3_mini,
    qwen1_5_0_5b,
    qwen1_5_1_8b,
    qwen2_5_0_5b,
    qwen2_5_1_5b,
    qwen2_5_3b,
    qwen2_5_7b,
    qwen3_0_6b,
    qwen3_1_7b,
    qwen3_4b,
    qwen3_8b,
    qwen3_14b,
    tinyllama_1_1b,
)
from tad_torchtune.models.checkpointer import HFCheckpointer
from tad_torchtune.models.gemma2 import gemma2
from tad_torchtune.models.phi2 import phi2
from tad_torchtune.models.qwen3 import qwen3
from tad_torchtune.models.student_init import init_student_from_teacher, select_layers
from tad_torchtune.models.students import (
    gemma2_student_2b,
    phi2_student_1_1b,
    qwen1_5_student_0_5b,
    qwen1_5_student_1_2b,
    qwen2_5_student_1_2b,
)

__all__ = [
    "HFCheckpointer",
    "gemma2_student_2b",
    "phi2_student_1_1b",
    "qwen1_5_student_0_5b",
    "qwen1_5_student_1_2b",
    "qwen2_5_student_1_2b",
    "gemma2",
    "gemma2_2b",
    "gemma2_9b",
    "init_student_from_teacher",
    "llama2_7b",
    "llama3_1_8b",
    "llama3_2_1b",
    "phi2",
    "phi2_2_7b",
    "phi3_medium",
    "phi3_mini",
    "qwen1_5_0_5b",
    "qwen1_5_1_8b",
    "qwen2_5_0_5b",
    "qwen2_5_1_5b",
    "qwen2_5_3b",
    "qwen2_5_7b",
    "qwen3",
    "qwen3_0_6b",
    "qwen3_1_7b",
    "qwen3_4b",
    "qwen3_8b",
    "qwen3_14b",
    "select_layers",
    "tinyllama_1_1b",
]
