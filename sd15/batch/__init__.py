"""Batch generation: one image per row of a JSONL or CSV job file, resumable, locally or on Ray Data.

    python -m sd15.batch prompts.jsonl --out out --ckpt v1-5-pruned-emaonly.safetensors [--ray [ADDRESS]]

The modules, in the order a run uses them:
    fields.py      the columns (A1111/CLI names) and how a row becomes a Request
    grid.py        list values -> grid axes -> one point per image
    ids.py         stable ids, derived seeds, request fingerprints
    job.py         reading JSONL/CSV, validating every image before anything runs
    output.py      the output folder: atomic PNGs, manifest.jsonl, errors.jsonl, the lock
    resume.py      what is left to make, what changed
    render.py      one image: the same code in the local process and in Ray workers
    local.py       the local runner
    ray_runner.py  the Ray Data runner (optional extra sd15[ray])
    contact.py     contact sheets of 1-D and 2-D grids
    session.py     one run: all of the above; cli.py: the command line
"""
