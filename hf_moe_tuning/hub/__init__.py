"""The Hub side of a run: what trained (``moe_run.json``), model cards and pushing.

Submodules are imported where used, so that the callbacks can record their settings
(:mod:`hf_moe_tuning.hub.run_record`) without importing the card and push code.
"""
