"""Offline batch captioning: inputs, the crash-safe journal, the job, and the worker process with
the supervisor that keeps a job alive around it. `llava-local caption` (cli/caption.py) is a thin layer."""
