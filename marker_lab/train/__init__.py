"""Training: the one SFT loop every stage uses (sft.py), and the toy world's pretraining built on it."""
