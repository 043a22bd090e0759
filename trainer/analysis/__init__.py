"""`launch/analyze.py`: how much of its rank a trained adapter uses.

    ranks.py    spectra, effective ranks, amplification, subspace similarity of two adapters
    figures.py  the terminal table, analysis.json and the figures
"""
