"""Recipes: ``kd_tad`` (``knowledge_distillation_tad``), full-parameter distillation with TAD.

``tune run tad_torchtune.recipes.kd_tad`` lands in this package's ``__main__`` (torchtune 0.6.1 passes
the dotted name through ``os.path.splitext``), which runs :func:`kd_tad.main` (a refused input: one line, exit code 1).
"""
