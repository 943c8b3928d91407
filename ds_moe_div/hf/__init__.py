"""Hugging Face MoE checkpoints in ds_moe_div: import, post-train through DeepSpeed's AutoEP, export.

families.py (the six supported families and their facts), load.py (checked local loading), autoep.py (the
one AutoEP touch point: routing records, token counts, expert bias, state-dict names), balance.py
(DeepSpeed's l_aux vs transformers' pooled aux_loss), model.py (PretrainedMoELM), session.py (what the
trainer does with model.pretrained), scratch.py (from-scratch models on this path, model.backend
"autoep"), export.py / scratch_export.py / autoep_scratch_export.py (checkpoint -> HF directory),
lora.py (peft LoRA on attention and grouped experts; `model.lora`), lora_checkpoint.py (a LoRA run's
trainable-state checkpoints), lora_export.py (merged / --adapter-only export), tiny.py (tiny random models, no hub).
Importing this package needs no transformers; its functions import it when called (extra `hf`).
"""
