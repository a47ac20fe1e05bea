"""DataModules: on-policy prompt sampling (``sampling.py``), prompt sources, ImageRewardDB preference pairs."""
