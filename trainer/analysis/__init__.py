"""`launch/analyze.py`: how much of its rank a trained adapter uses.

    loading.py  an adapter dir's lora_A/lora_B and scaling, and its base's weights W, read from disk
    ranks.py    spectra, effective ranks, amplification, subspace similarity of two adapters
    figures.py  the terminal table, analysis.json and the figures
"""
