"""SkyCaptioner-V1 (Qwen2.5-VL-7B finetune) export.

loader.py   check and load a checkpoint folder through transformers (the reference)
graphs.py   traceable vision tower and decoder sharing the transformers weights
export.py   export_captioner_onnx(): vision.onnx, decoder.onnx (prefill + decode profiles), manifest
tiny.py     tiny random checkpoints in the real folder layout (tests, benchmarks)

The runtime side (torch-free) is skyrt.runtime.captioner and skyrt.runtime.caption_schema.
"""
