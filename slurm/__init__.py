"""Slurm launchers (submitit): multi-node pretraining, finetuning arrays, a Ray cluster for preprocessing.

cluster.py holds the typed cluster profile (configs/slurm/*.yaml) and renders sbatch parameters,
submit.py the three submitters and the callables the jobs run, ray_cluster.py the Ray-on-Slurm bootstrap.
"""
