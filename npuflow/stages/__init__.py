"""Pipeline stages that are not quantization or benchmarking: fetch, convert, validate."""
