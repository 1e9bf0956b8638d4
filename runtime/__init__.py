"""skyrt.runtime — the thin runtime: backends, rollout driver, streaming VAE, server and CLI.

Nothing here imports torch at module level: the onnxruntime and TensorRT serving paths must run
without it. The torch reference backend imports skyrt.export lazily.
"""
