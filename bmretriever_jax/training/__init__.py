"""Contrastive training (`bmr train`): the jitted step (`step.py`), the resume guard (`resume.py`) and the loop
(`loop.py`). Everything callers use is importable from here: `from bmretriever_jax.training import train, ...`."""
from bmretriever_jax.training.loop import (NonFiniteLoss, dev_eval, export_model, host_params, load_training_pairs,
                                        train)
from bmretriever_jax.training.resume import RESUMABLE_CHANGES, check_resume_config, config_changes
from bmretriever_jax.training.step import (BATCH_AXES, assemble, init_state, lora_config, make_mesh, make_optimizer,
                                        make_schedule, make_tokenize_fn, make_train_step, merged_params, split_params,
                                        to_global)

__all__ = ["BATCH_AXES", "NonFiniteLoss", "RESUMABLE_CHANGES", "assemble", "check_resume_config", "config_changes",
           "dev_eval", "export_model", "host_params", "init_state", "load_training_pairs", "lora_config", "make_mesh",
           "make_optimizer", "make_schedule", "make_tokenize_fn", "make_train_step", "merged_params", "split_params",
           "to_global", "train"]
