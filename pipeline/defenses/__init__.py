"""Backdoor defences used as baselines for MuScleLoRA (arXiv 2402.12026)."""
