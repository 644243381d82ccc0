"""Planning a run before it starts: its FLOPs per token (``flops``, ``tad-tune flops``) and its per-GPU memory
(``memory``, ``tad-tune plan``), both from the loss path the recipe will take (``loss_plan``: fused or chunked
logits, decided by the recipe's own rule in ``training/loss_path.py``)."""
