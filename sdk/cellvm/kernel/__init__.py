"""The cellvm Jupyter kernel (each cell runs in a microVM restored from the
previous cell's checkpoint). Not built yet: see the sandbox and kernel issues."""
