"""LightningModules, one algorithm per file: DDPO, ReFL, reward-model pretraining, denoising pretraining."""
