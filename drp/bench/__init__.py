"""The benchmark, `python -m drp.bench`: drp against diffusers on random full-size SD 1.5 weights.

Off the reading path: nothing else in drp imports it. Its files, top down; each imports only files
below it (tests/test_imports.py checks that no import circle forms):

    run.py         the parent: flags, plan, one child process per measurement, the report and the targets
    child.py       a child's entry point, `python -m drp.bench.child SPEC`: runs one task, writes its result
    tasks.py       SD's measurements: UNet and the DRP step, VAE, text encoder, attention, generation, load
    ip_adapter.py  IP-Adapter's: the image encoder, the step with the adapter, loading the encoder
    drp_ip.py      DRP-Diff's IP-Adapter mode: its step and SVDs, its first run against the other mode's
    weights.py     random weights written as users have them; the reference models on the same tensors
    timing.py      clocks, extrapolation to 50 steps, peak memory, cold starts
"""
