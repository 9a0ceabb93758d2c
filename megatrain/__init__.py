"""megatrain: pretrain GPT-style language models on Slurm supercomputers, and know what it cost."""

try:
    from importlib.metadata import version as _version

    __version__ = _version("megatrain")
except Exception:  # running from a source tree that is not installed
    __version__ = "0.0.0+src"
