"""Offline batch captioning: inputs.py (what to caption), journal.py (the crash-safe output JSONL),
job.py (fingerprint, resume, run_job), export.py (sidecars, CSV), worker.py (the engine in its own
process) and supervisor.py (which keeps a job alive around it). On a Ray cluster (`--ray`, the
[ray] extra): ray_job.py (the job and its Python API), ray_actors.py, ray_plan.py and blocks.py.
`llava-local caption` (cli/caption.py) is a thin layer."""
