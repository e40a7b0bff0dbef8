"""Finetuning and evaluation: the paper's four settings, the baselines, CV protocols, metrics and reports."""
