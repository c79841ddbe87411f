"""Quantization: primitives -> schemes -> streaming/model (RTN, GPTQ) -> sensitivity, fallback -> stage."""
