"""Multi-LoRA serving: many PEFT adapters on one base model, batched together.

    request.py   LoRARequest(lora_name, lora_int_id, lora_path): what a request names (no torch)
    peft.py      reading and checking a PEFT adapter folder without torch (the front-end's check)
    registry.py  the adapters an engine knows: one id -> one name and folder (front-end)
    weights.py   an adapter's tensors laid out for the LoRA layers' slots (worker side, torch)
    model.py     rewrite a model's projections as LoRA layers (model/layers/lora.py)
    manager.py   the worker's adapters: max_cpu_loras loaded (LRU), max_loras in slots

This package's __init__ imports nothing: core/ and engine/ import request.py and peft.py, and
must not pull torch in with them.
"""
