"""Front ends that run in a process of their own: `python -m sd15.generate`, `python -m sd15.inspect`."""
