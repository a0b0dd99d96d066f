"""The experiments that ship with the package: `transformer-jax train --config NAME` runs
`NAME.py` from this folder (from any directory, editable install or wheel). Each file's
docstring gives its command, the hardware it is sized for and the result it should reach.
Your own experiment is any file with `get_config()`: `--config path/to/file.py`.
"""
