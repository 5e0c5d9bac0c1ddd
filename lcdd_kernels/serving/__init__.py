"""Serving carriers outside the package: vLLM in a venv of its own (``vllm_env``, ``vllm_runner``)."""
