"""Datasets and their preparation (`data/<name>/prepare.py`), as nanoGPT lays them out.

A package only so launch scripts can reuse a prepare script's logic (`data.gsm8k.prepare`); the
trainer never imports it.
"""
