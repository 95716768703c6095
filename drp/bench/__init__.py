"""The benchmark, `python -m drp.bench`: drp against diffusers on random full-size SD 1.5 weights."""
