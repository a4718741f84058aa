"""Stage types: one class per type (`align.stages.base.Stage`), listed once in `align.stages.registry`.

Each module reads top to bottom in the same order: config -> data -> model -> trainer -> train -> save ->
metrics. The TRL stages share one skeleton (`_trl.TRLStage`); PPO and eval implement `run` themselves.
"""
